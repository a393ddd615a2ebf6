"""Command-line entry of hamjax.bench.delta_rule (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.delta_rule import main

if __name__ == "__main__":
    main()
