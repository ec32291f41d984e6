"""Reading and writing checkpoints."""

from raysoup.io.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    import_state_dict,
    is_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)

__all__ = [
    "META_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "CheckpointMeta",
    "import_state_dict",
    "is_checkpoint",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
]
