"""``python -m xmodal``: the same command as ``xmodal`` (used by ``accelerate launch -m xmodal``)."""
from .cli import main

if __name__ == "__main__":
    main()
