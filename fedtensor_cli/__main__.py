"""``python -m fedtensor_cli`` — same as the ``fedtensor`` console script."""

from fedtensor_cli.app import main

if __name__ == "__main__":
    main(prog_name="fedtensor")
