"""Command-line entry of hamjax.bench.decode (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.decode import main

if __name__ == "__main__":
    main()
