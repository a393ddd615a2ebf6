"""Command-line entry of hamjax.bench.profile (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.profile import main

if __name__ == "__main__":
    main()
