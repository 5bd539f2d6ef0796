"""python with_constants.py "mod.NAME=V mod.NAME=V" MODULE args...: run MODULE as __main__ with integer constants set."""
import importlib, runpy, sys
for item in sys.argv[1].split():
    target, value = item.split("=")
    module, name = target.rsplit(".", 1)
    setattr(importlib.import_module(module), name, int(value))
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__")
