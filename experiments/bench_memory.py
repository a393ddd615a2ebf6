"""Command-line entry of hamjax.bench.memory (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.memory import main

if __name__ == "__main__":
    main()
