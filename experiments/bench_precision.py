"""Command-line entry of hamjax.bench.precision (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.precision import main

if __name__ == "__main__":
    main()
