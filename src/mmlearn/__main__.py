"""``python -m mmlearn`` is the same as the ``mmlearn`` console script."""

from mmlearn.cli import main

if __name__ == "__main__":
    main()
