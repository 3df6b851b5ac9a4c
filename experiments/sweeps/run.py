"""The ``program:`` of the sweep files: ``wandb agent`` runs ``python experiments/sweeps/run.py``.

It is ``mmlearn`` itself (the same as ``python -m mmlearn``), kept as a file because the agent
runs ``${interpreter} ${program}``.
"""

from mmlearn.cli import main

if __name__ == "__main__":
    main()
