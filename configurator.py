"""
configurator.py: nanoGPT-style command-line overrides, shared by train.py, sample.py and the other
scripts. Not a module: a script exec's it after defining its config globals, so the code below reads
and writes that script's globals(). The script's side of the contract, in this order:

    batch_size = 16                # ... the script's config globals, one comment each ...
    config_keys = [k for k, v in globals().items()
                   if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, type(None)))]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    config = {k: globals()[k] for k in config_keys}   # the resolved config, to print and save

Arguments, applied left to right (later ones win):
    config/tiny_cpu.py   a config file of plain Python assignments; it may only assign config keys
                         (and names starting with "_", which it keeps to itself)
    --key=value          value parsed with ast.literal_eval, never eval; text that is not a Python
                         literal stays a string (allowed where the default is a str or None); where the
                         default is a str, any text that is not a string literal stays as it is typed
                         (--out_dir=2024 means "2024")
    --flag               sets a bool key to True
    --help, -h           lists the config keys with their current values, exits 0
A value must have its default's type, except that an int is promoted to float and a default of None
takes anything. A script may also define, before exec'ing this file,

    config_ranges = {'beta1': '[0, 1)', 'top_k': 'int [1, inf)', ...}

the valid interval of a numeric key ("[" and "]" closed, "(" and ")" open; "int" where a default of
None must take a whole number; a key whose value is None, unset or off, is not checked), or a tuple
of the values a key may take (dtype=('float32', 'bfloat16')). An unknown
key, a wrong type, a value out of its range or a missing config file prints one line on stderr and
exits with code 2, before the script does any work. Afterwards `config_given` lists the keys that a
config file or a flag set (the script may treat them differently from defaults, e.g. refuse model
flags on resume). Overrides print only on the master process (env RANK unset or "0"). A script
that renamed keys lists them as config_renamed = {old: new}: the old name is read as the new one.
"""
import ast, builtins as _builtins, difflib, os, re, sys

def die(message, code=1):
    """Every script's way out on an error: "error: <message>" on stderr (rank 0's alone under
    torchrun), the process group torn down, exit code `code` (2: a bad flag or input; 1: a failure).
    Scripts get it by exec'ing this file; plan.py imports it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    _torch = sys.modules.get("torch")
    if _torch is not None and _torch.distributed.is_available() and _torch.distributed.is_initialized():
        _torch.distributed.destroy_process_group()
    sys.exit(code)

# names start with "_" so that nothing else here clobbers or adds to the script's own globals
_master = os.environ.get("RANK", "0") == "0"
_imported = globals().get("__name__") == "configurator"  # imported for die() alone: no arguments to parse
if "config_keys" not in globals() and not _imported:
    raise NameError("configurator.py: the script must define config_keys before exec'ing it")

def _fail(message):
    die(message, 2)

def _renamed(key):
    # a key the script renamed (config_renamed = {old: new}) is read as its new name, with a note
    _new = globals().get("config_renamed", {}).get(key)
    if _new is not None and _master:
        print(f"note: '{key}' is now called '{_new}'", file=sys.stderr)
    return _new or key

def _checked(key, value):
    # the value to store for key, or exit 2: unknown key, or a type other than the default's
    if key not in config_keys:
        close = difflib.get_close_matches(key, config_keys, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "--help lists the valid keys"
        _fail(f"unknown config key '{key}' ({hint})")
    default = globals()[key]
    if default is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:  # int -> float; bool is an int but not allowed
        return float(value)
    _fail(f"config key '{key}' expects {type(default).__name__} (default {default!r}), got {value!r}")

def _in_range(key, value, spec):
    # spec "[low, high)" (optionally led by "int"): value must be a number inside it
    _m = re.fullmatch(r"(int )?([\[(])\s*(\S+),\s*(\S+)\s*([\])])", spec)
    if _m is None:
        raise ValueError(f"configurator.py: bad range {spec!r} for '{key}'")
    _int, _lo_open, _lo, _hi, _hi_open = _m[1], _m[2] == "(", float(_m[3]), float(_m[4]), _m[5] == ")"
    _number = (int,) if _int else (int, float)
    if isinstance(value, bool) or not isinstance(value, _number) or value != value:  # value != value: nan
        return False
    return (value > _lo if _lo_open else value >= _lo) and (value < _hi if _hi_open else value <= _hi)

config_given = []

# ----------------------------------------------------------------------------
for _arg in ([] if _imported else sys.argv[1:]):
    if _arg in ("--help", "-h"):
        print("config keys (current values):")
        for _key in config_keys:
            _spec = globals().get("config_ranges", {}).get(_key)
            print(f"  --{_key}={globals()[_key]!r}" + (f"    {_spec}" if _spec else ""))
        sys.exit(0)
    elif not _arg.startswith("--"):
        # a config file: run it in a scratch namespace seeded with the current values, then apply
        # what it assigned, so that a typo in a file is caught like a typo on the command line
        if not os.path.isfile(_arg):
            _fail(f"config file '{_arg}' not found")
        with open(_arg) as _f:
            _source = _f.read()
        if _master:
            print(f"Overriding config with {_arg}:\n{_source}")
        _scope = {_key: globals()[_key] for _key in config_keys}
        # footgun: nanoGPT scripts have a config key named `compile`, which shadows the builtin here
        exec(_builtins.compile(_source, _arg, "exec"), _scope)
        for _key, _val in _scope.items():
            # skip private names, __builtins__ and imported modules (a file may `import math`)
            if not _key.startswith("_") and type(_val) is not type(os):
                globals()[_renamed(_key)] = _checked(_renamed(_key), _val)
        _assigned = [_renamed(_t.id) for _node in ast.walk(ast.parse(_source)) if isinstance(_node, ast.Assign)
                     for _t in _node.targets if isinstance(_t, ast.Name)]
        config_given += [_key for _key in _assigned if _key in config_keys and _key not in config_given]
    elif "=" not in _arg:
        _key = _renamed(_arg[2:])
        if _key in config_keys and type(globals()[_key]) is not bool:
            _fail(f"config key '{_key}' is not a bool: give it a value, --{_key}=...")
        globals()[_key] = _checked(_key, True)
        config_given += [_key] if _key not in config_given else []
        if _master:
            print(f"Overriding: {_key} = True")
    else:
        _key, _text = _arg[2:].split("=", 1)
        _key = _renamed(_key)
        try:
            _val = ast.literal_eval(_text)
        except Exception:  # literal_eval raises ValueError, SyntaxError, TypeError, ... on non-literals
            _val = _text  # stays a string; _checked rejects it unless the default is a str or None
        if type(globals().get(_key)) is str and type(_val) is not str:
            _val = _text  # for a str key, --out_dir=2024 means the text "2024", not the int
        globals()[_key] = _checked(_key, _val)
        config_given += [_key] if _key not in config_given else []
        if _master:
            print(f"Overriding: {_key} = {globals()[_key]!r}")

for _key, _spec in globals().get("config_ranges", {}).items():
    if isinstance(_spec, tuple):  # the values allowed
        if globals()[_key] not in _spec:
            _fail(f"--{_key}={globals()[_key]!r}: {_key} must be {', '.join(map(repr, _spec[:-1]))} or {_spec[-1]!r}")
    elif globals()[_key] is not None and not _in_range(_key, globals()[_key], _spec):
        _what = f"a whole number in {_spec[4:]}" if _spec.startswith("int ") else f"in {_spec}"
        _fail(f"--{_key}={globals()[_key]!r}: {_key} must be {_what}")
