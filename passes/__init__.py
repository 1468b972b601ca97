"""Built-in passes. Importing this package registers them (see onnxc.pass_manager.register_pass)."""
from . import (  # noqa: F401  (imported for registration)
    eliminate_cse,
    eliminate_dead,
    fold_constants,
    infer_shapes,
    remove_noops,
    sort_topologically,
)
