"""A tensor-parallel child rank's process: `python -m mistralrs.engine.tp_rank`, its `ChildPayload` on stdin
(mistralrs/engine/tensor_parallel.py). A module of its own, so the runtime's classes are imported under their own
name (the head pickles messages with them), never run as `__main__`."""

from mistralrs.engine.tensor_parallel import main

if __name__ == "__main__":
    main()
