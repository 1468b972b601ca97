"""Built-in passes. Importing this package registers them (see onnxc.pass_manager.register_pass)."""
from . import (  # noqa: F401  (imported for registration)
    eliminate_cse,
    eliminate_dead,
    fold_constants,
    infer_shapes,
    remove_noops,
    sort_topologically,
)
from . import fuse_gqa  # noqa: F401
from . import convert_fp16  # noqa: F401
from . import quantize_int4  # noqa: F401
from . import fuse_rms_norm  # noqa: F401
from . import fuse_attention  # noqa: F401
from . import fuse_gelu  # noqa: F401
from . import fuse_layer_norm  # noqa: F401
from . import fuse_skip_norm  # noqa: F401
from . import fuse_embed_layer_norm  # noqa: F401
