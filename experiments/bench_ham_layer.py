"""Command-line entry of hamjax.bench.ham_layer (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.ham_layer import main

if __name__ == "__main__":
    main()
