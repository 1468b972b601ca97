"""Built-in passes. Importing this package registers them (see onnxc.pass_manager.register_pass)."""
from . import (  # noqa: F401  (imported for registration)
    convert_fp16,
    eliminate_cse,
    eliminate_dead,
    fold_constants,
    fuse_attention,
    fuse_embed_layer_norm,
    fuse_gelu,
    fuse_gqa,
    fuse_layer_norm,
    fuse_rms_norm,
    fuse_skip_norm,
    infer_shapes,
    pack_projections,
    quantize_int4,
    remove_noops,
    sort_topologically,
)
