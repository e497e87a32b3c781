"""`python -m dali_fl` is the same as the `dali-fl` command (torchrun uses this form)."""
from dali_fl.cli import main

main()
