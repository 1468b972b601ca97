"""Built-in passes. Importing this package registers them (see onnxc.pass_manager.register_pass): every module in
this folder is imported, in name order, so a new pass is one new file."""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")
