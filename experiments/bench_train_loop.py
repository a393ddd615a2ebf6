"""Command-line entry of hamjax.bench.train_loop (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.train_loop import main

if __name__ == "__main__":
    main()
