"""Reading an adapter folder nobody vouches for: adapter_config.json + adapter_model.safetensors.

Every reader of PEFT-format adapters (TrainingSession.load_adapters, `pyedge eval --adapters`,
`pyedge merge`, pyedge.torch.load_adapters) starts with `read_adapter_folder`, which checks the
whole folder before its caller changes anything:

* files: both resolve inside the folder (a symlink out of it is refused) and are regular files
  (a FIFO would block the reader); the weights are parsed by a strict safetensors reader
  (header, dtypes and data offsets checked against the file's size, so a truncated file names
  the tensor that is cut off). BF16 is read too (numpy has no bfloat16);
* values: LoRA tensors are floating point; F16/BF16/F64 become float32; every float is finite
  (also after the narrowing: an F64 1e300 is refused, not turned into inf);
* config: a JSON object; peft_type LORA (any other method is named in the error); r an integer
  >= 1 and lora_alpha a finite positive number, also inside rank_pattern / alpha_pattern;
  booleans where PEFT has booleans; target_modules a string (regex) or a list of strings;
* consistency: each LoRA module has lora_A [r, in, k...] and lora_B [out, r, 1...] whose r is
  the one the config gives that module; the module is one that target_modules selects (PEFT's
  rule); every other tensor belongs to a modules_to_save module.

Whether the shapes fit a particular model is for each reader to check against its model,
still before writing (pyedge/export/peft.py for a session, merge.py for an ONNX file,
pyedge/torch.py for a torch module). Every error is an AdapterError of one line naming the
file and the tensor or config key. numpy + json only: this runs on the device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import stat

import numpy as np

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 16 << 20     # PEFT configs are kilobytes; rank_pattern of a big model, less
MAX_HEADER_BYTES = 100 << 20    # safetensors' own limit on its JSON header


class AdapterError(ValueError):
    """The adapter folder is unreadable, inconsistent, or does not fit the model/session."""


def q(name) -> str:
    """A tensor/key name quoted for a message; repr keeps a hostile name on one line."""
    return repr(str(name))


@dataclasses.dataclass
class AdapterFiles:
    """A validated adapter folder. Floats are float32 copies; `keys` maps (module, "A"/"B") and
    whole-tensor names back to the file's keys (for messages)."""
    folder: str
    config_path: str
    weights_path: str
    config: dict
    tensors: dict[str, np.ndarray]
    lora: dict[str, dict[str, np.ndarray]]
    whole: dict[str, np.ndarray]
    keys: dict
    # per module, tensors a LoRA variant adds beside A/B: {module: {"lora_magnitude_vector": arr}}
    extra: dict = dataclasses.field(default_factory=dict)

    def key_of(self, module: str, ab: str | None = None) -> str:
        return self.keys.get((module, ab) if ab else module, module)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def resolve_inside(folder: str, name: str) -> str | None:
    """The real path of folder/name, None when absent; AdapterError when it resolves outside
    the folder (a symlink out) or is not a regular file."""
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        return None
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise AdapterError(f"{path}: resolves to {real}, outside the adapter folder (a symlink "
                           "out of it); refused")
    try:
        st = os.stat(real)
    except OSError as e:
        raise AdapterError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"{path}: not a regular file")
    return real


def _open_regular(real: str, shown: str) -> int:
    """An fd on `real`, refusing a symlink swapped in since resolve_inside (O_NOFOLLOW) and
    anything that is not a regular file."""
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise AdapterError(f"{shown}: cannot be opened ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterError(f"{shown}: not a regular file")
    return fd


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
              "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4",
              "U64": "<u8", "BOOL": "?"}


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def read_safetensors(path: str, shown: str | None = None) -> dict[str, np.ndarray]:
    """{name: array} from a safetensors file, strictly: the 8-byte header length, a JSON header
    of {name: {dtype, shape, data_offsets}}, offsets that tile the data section exactly (no gap,
    overlap or byte past the file's end). Floats come back as float32 (BF16 widened), integers
    and bools as they are; all arrays are copies (the file is closed on return)."""
    shown = shown or path
    fd = _open_regular(path, shown)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise AdapterError(f"{shown}: not a safetensors file ({size} bytes; the header "
                               "length alone takes 8)")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        return _parse_safetensors(mm, size, shown)
    finally:
        mm.close()


def _parse_safetensors(buf, size: int, shown: str) -> dict[str, np.ndarray]:
    n = int.from_bytes(buf[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise AdapterError(f"{shown}: truncated or not a safetensors file (its header claims "
                           f"{n} bytes, the file has {size - 8} after the length)")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{shown}: not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{shown}: not a safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        where = f"{shown}: tensor {q(key)}"
        if not isinstance(info, dict):
            raise AdapterError(f"{where}: header entry is not an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in _ST_DTYPES:
            raise AdapterError(f"{where}: dtype {dt!r} is not supported (floats F16/BF16/F32/"
                               "F64, integers and BOOL are)")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise AdapterError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise AdapterError(f"{where}: data_offsets {offs!r} are not [begin, end]")
        need = math.prod(shape) * np.dtype(_ST_DTYPES[dt]).itemsize
        if offs[1] - offs[0] != need:
            raise AdapterError(f"{where}: shape {shape} of {dt} takes {need} bytes, its "
                               f"data_offsets span {offs[1] - offs[0]}")
        if offs[1] > data_len:
            raise AdapterError(f"{where}: its data ends at byte {offs[1]} of the data section, "
                               f"the file holds {data_len} bytes there (truncated file)")
        spans.append((offs[0], offs[1], key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else \
                f"leaves a gap of {begin - pos} bytes before it"
            raise AdapterError(f"{shown}: tensor {q(key)} {what} (not a valid safetensors file)")
        pos = end
    if pos != data_len:
        raise AdapterError(f"{shown}: {data_len - pos} bytes after the last tensor (not a valid "
                           "safetensors file)")
    base = 8 + n
    out = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        dt = info["dtype"]
        raw = np.frombuffer(buf, dtype=_ST_DTYPES[dt], count=(end - begin) //
                            np.dtype(_ST_DTYPES[dt]).itemsize, offset=base + begin)
        if dt == "BF16":  # the high half of a float32
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        elif raw.dtype.kind == "f":
            with np.errstate(over="ignore"):
                arr = raw.astype(np.float32)   # overflow -> inf, refused by check_values
        else:
            arr = raw.astype(raw.dtype.newbyteorder("="))
        del raw
        out[key] = arr.reshape(info["shape"])
    return out


def check_values(shown: str, key: str, arr: np.ndarray, float_only: bool = False) -> None:
    """Finite floats; with float_only, no integer/bool tensor either."""
    if arr.dtype.kind == "f":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise AdapterError(f"{shown}: tensor {q(key)} has {bad} non-finite value(s) "
                               f"(NaN/inf) of {arr.size}")
    elif float_only:
        raise AdapterError(f"{shown}: tensor {q(key)} is {arr.dtype}; it must hold floating "
                           "point values")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def _rank(v, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise AdapterError(f"{where}: {what} must be an integer >= 1, got {v!r}")
    return v


def _alpha(v, what: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise AdapterError(f"{where}: {what} must be a finite positive number, got {v!r}")
    return float(v)


# A quantified group that itself holds a quantifier, e.g. (a+)+ or (.*x)*: Python's regex
# engine can take exponential time on such patterns (catastrophic backtracking). A heuristic:
# overlapping alternations like (a|aa)* still pass.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)[+*{]")
MAX_PATTERN_CHARS = 1000


def _pattern(p, what: str, where: str) -> None:
    if not isinstance(p, str) or not p:
        raise AdapterError(f"{where}: {what} pattern {p!r} is not a non-empty string")
    if len(p) > MAX_PATTERN_CHARS or _NESTED_QUANTIFIER.search(p):
        raise AdapterError(f"{where}: {what} pattern {p[:80]!r} is refused (longer than "
                           f"{MAX_PATTERN_CHARS} characters or a quantified group holding a "
                           "quantifier: catastrophic backtracking)")
    try:
        re.compile(p)
    except re.error as e:
        raise AdapterError(f"{where}: {what} pattern {p!r} is not a valid regex ({e})") from None


def check_config(config: dict, where: str = "adapters") -> None:
    """Refuses what pyedge cannot load or what makes no sense; `where` names the file."""
    for k in ("use_dora", "use_rslora", "fan_in_fan_out", "inference_mode"):
        v = config.get(k)
        if v is not None and not isinstance(v, bool):
            raise AdapterError(f"{where}: {k} must be true or false, got {v!r}")
    from pyedge.adapters.base import method_for_peft  # names a PEFT method pyedge lacks
    method_for_peft(config, where)
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "pissa", "olora"):
        raise AdapterError(f"{where}: init_lora_weights={init!r} is not supported (true, false, "
                           "'gaussian', 'pissa', 'olora')")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{where}: bias={config['bias']!r} is not supported (use 'none')")
    for k in ("layer_replication",):
        if config.get(k):
            raise AdapterError(f"{where}: {k} is not supported")
    _rank(config.get("r", 8), "r", where)
    _alpha(config.get("lora_alpha", 8), "lora_alpha", where)
    for key, check, what in (("rank_pattern", _rank, "rank"), ("alpha_pattern", _alpha, "alpha")):
        pats = config.get(key) or {}
        if not isinstance(pats, dict):
            raise AdapterError(f"{where}: {key} must be an object, got {pats!r}")
        for p, v in pats.items():
            _pattern(p, key, where)
            check(v, f"{key}[{p!r}]", where)
    d = config.get("lora_dropout", 0.0)
    if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float))
                          or not 0 <= d < 1):
        raise AdapterError(f"{where}: lora_dropout must be in [0, 1), got {d!r}")
    tm = config.get("target_modules")
    if isinstance(tm, str):
        _pattern(tm, "target_modules", where)
    elif tm is not None and (not isinstance(tm, list) or
                             not all(isinstance(t, str) and t for t in tm)):
        raise AdapterError(f"{where}: target_modules must be a regex string or a list of module "
                           f"names, got {tm!r}")
    mts = config.get("modules_to_save")
    if mts is not None and (not isinstance(mts, list) or
                            not all(isinstance(t, str) and t for t in mts)):
        raise AdapterError(f"{where}: modules_to_save must be a list of module names, got {mts!r}")


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """(r, lora_alpha) for a module, honouring rank_pattern/alpha_pattern like PEFT."""
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    for pat, v in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            r = int(v)
            break
    for pat, v in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            alpha = float(v)
            break
    return r, alpha


def module_scaling(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) for a module: alpha/r, or alpha/sqrt(r) with use_rslora."""
    r, alpha = module_rank_alpha(config, module)
    return r, float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def targets_module(config: dict, module: str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal the name
    or be a '.'-separated suffix of it ('all-linear' is expanded by PEFT before saving, but
    accepted as matching anything)."""
    tm = config.get("target_modules")
    if tm is None:
        return True
    if isinstance(tm, str):
        return tm == "all-linear" or re.fullmatch(tm, module) is not None
    return any(module == t or module.endswith("." + t) or t == "all-linear" for t in tm)


def saved_module_suffixes(config: dict) -> list[str]:
    """Modules whose tensors PEFT saves whole: modules_to_save, plus classifier/score for
    sequence/token classification (PEFT adds them)."""
    out = list(config.get("modules_to_save") or [])
    if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):
        out += ["classifier", "score"]
    return out


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight$")


# tensors a LoRA variant saves per module beside lora_A/lora_B (DoRA: [out])
LORA_EXTRA_SUFFIXES = ("lora_magnitude_vector",)


def split_keys(tensors: dict[str, np.ndarray], adapter_name: str = "default", shown: str = "",
               keys: dict | None = None, extra: dict | None = None,
               extra_suffixes: tuple = LORA_EXTRA_SUFFIXES):
    """PEFT keys -> ({module: {"A": arr, "B": arr}}, {torch param name: arr}).

    Accepts both the saved form (``base_model.model.m.lora_A.weight``) and the in-memory one
    (``...lora_A.default.weight``, ``...modules_to_save.default.weight``). `keys`, when given,
    receives (module, "A"/"B") / whole name -> file key; `extra`, when given, receives
    {module: {suffix: arr}} for LORA_EXTRA_SUFFIXES (refused as unsupported otherwise)."""
    lora: dict[str, dict[str, np.ndarray]] = {}
    whole: dict[str, np.ndarray] = {}
    keys = {} if keys is None else keys
    where = f"{shown}: " if shown else ""
    for key, arr in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_RE.match(name)
        if m and m.group("adapter") in (None, adapter_name):
            mod, ab = m.group("module"), m.group("ab")
            if ab in lora.get(mod, {}):
                raise AdapterError(f"{where}tensor {q(key)}: a second lora_{ab} for module "
                                   f"{q(mod)} (also {q(keys[(mod, ab)])})")
            lora.setdefault(mod, {})[ab] = arr
            keys[(mod, ab)] = key
            continue
        mod, dot, suffix = name.rpartition(".")
        # a method's tensor may sit below its suffix (LN tuning: <module>.ln_tuning_layers.bias)
        own = next((s for s in extra_suffixes[len(LORA_EXTRA_SUFFIXES):]
                    if f".{s}." in name), None)
        if own is not None:
            mod, _, rest = name.partition(f".{own}.")
            suffix = f"{own}.{rest}"
        if extra is not None and (suffix in extra_suffixes or own is not None):
            if suffix in extra.get(mod, {}):
                raise AdapterError(f"{where}tensor {q(key)}: a second {suffix} for module "
                                   f"{q(mod)}")
            extra.setdefault(mod, {})[suffix] = arr
            keys[(mod, suffix)] = key
            continue
        if ".lora_" in name:
            raise AdapterError(f"{where}tensor {q(key)}: unsupported LoRA tensor (DoRA, LoRA "
                               "bias, embedding LoRA or another adapter name are not supported)")
        name = name.replace(f".modules_to_save.{adapter_name}.", ".")
        name = name.replace(".original_module.", ".")
        if name in whole:
            raise AdapterError(f"{where}tensor {q(key)}: the same tensor as {q(keys[name])}")
        whole[name] = arr
        keys[name] = key
    return lora, whole


def _check_consistency(config, lora, whole, keys, shown, cfg_path, is_lora=True):
    """LoRA pairs complete, ranks as the config says, modules that target_modules selects;
    whole tensors under modules_to_save."""
    for module, ab in lora.items():
        if "A" not in ab or "B" not in ab:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            key = keys[(module, have)]
            want = key.replace(f".lora_{have}", f".lora_{lack}")
            raise AdapterError(f"{shown}: tensor {q(want)} is missing (module {q(module)} has "
                               f"only {q(key)})")
        A, B = ab["A"], ab["B"]
        for x, arr in (("A", A), ("B", B)):
            check_values(shown, keys[(module, x)], arr, float_only=True)
        if not 2 <= A.ndim <= 5 or B.ndim != A.ndim or any(d != 1 for d in B.shape[2:]) \
                or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{shown}: tensors {q(keys[(module, 'A')])} {list(A.shape)} and "
                               f"{q(keys[(module, 'B')])} {list(B.shape)} are not a LoRA pair "
                               "(A [r, in, k...], B [out, r, 1...])")
        r, _ = module_rank_alpha(config, module)
        if A.shape[0] != r:
            raise AdapterError(f"{shown}: tensor {q(keys[(module, 'A')])} has rank {A.shape[0]} "
                               f"(shape {list(A.shape)}), {os.path.basename(cfg_path)} says "
                               f"r={r} for module {q(module)}")
        if not targets_module(config, module):
            raise AdapterError(f"{shown}: tensor {q(keys[(module, 'A')])} adapts module "
                               f"{q(module)}, which target_modules="
                               f"{config.get('target_modules')!r} in "
                               f"{os.path.basename(cfg_path)} does not select")
    if lora and not is_lora:
        raise AdapterError(f"{shown}: LoRA tensors in a {config.get('peft_type')} folder")
    if not lora and config.get("target_modules") and is_lora:
        raise AdapterError(f"{shown}: no LoRA tensors, but {os.path.basename(cfg_path)} targets "
                           f"{config.get('target_modules')!r}")
    suffixes = saved_module_suffixes(config)
    for name, arr in whole.items():
        check_values(shown, keys[name], arr)
        parts = name.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]
        if not any(o.endswith(t) for o in owners for t in suffixes):
            raise AdapterError(f"{shown}: tensor {q(keys[name])} is neither LoRA nor in a module "
                               f"that modules_to_save={config.get('modules_to_save')!r} in "
                               f"{os.path.basename(cfg_path)} names")


def _check_extra(config, lora, extra, keys, shown, cfg_path):
    """DoRA's magnitude: present exactly for the LoRA modules when use_dora, shape [out]."""
    for module, ts in extra.items():
        for suffix, arr in ts.items():
            key = keys[(module, suffix)]
            check_values(shown, key, arr, float_only=True)
            if not config.get("use_dora"):
                raise AdapterError(f"{shown}: tensor {q(key)} is an unsupported LoRA tensor "
                                   "here: it is DoRA's, but use_dora is not true in the config")
            if module not in lora:
                raise AdapterError(f"{shown}: tensor {q(key)} has no lora_A/lora_B beside it")
            if arr.ndim != 1 or arr.shape[0] != lora[module]["B"].shape[0]:
                raise AdapterError(f"{shown}: tensor {q(key)} has shape {list(arr.shape)}, "
                                   f"expected [{lora[module]['B'].shape[0]}] (lora_B's rows)")
    if config.get("use_dora"):
        lacking = sorted(m for m in lora if "lora_magnitude_vector" not in extra.get(m, {}))
        if lacking:
            raise AdapterError(f"{cfg_path}: use_dora is true (DoRA) but {shown} has no "
                               f"lora_magnitude_vector for module(s) {lacking[:5]}")


# --------------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------------
def read_adapter_folder(folder) -> AdapterFiles:
    """Reads and validates a PEFT adapter folder (see the module doc); nothing is trusted."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise AdapterError(f"{folder}: no such adapter folder")
    cfg_shown = os.path.join(folder, CONFIG_NAME)
    w_shown = os.path.join(folder, WEIGHTS_NAME)
    cfg_real = resolve_inside(folder, CONFIG_NAME)
    if cfg_real is None:
        raise AdapterError(f"{folder}: no {CONFIG_NAME}")
    w_real = resolve_inside(folder, WEIGHTS_NAME)
    if w_real is None:
        other = [f for f in ("adapter_model.bin", "adapter_model.pt") if
                 os.path.exists(os.path.join(folder, f))]
        hint = f" ({other[0]} is a pickle file and is never loaded; re-save with " \
               "safe_serialization=True)" if other else ""
        raise AdapterError(f"{folder}: no {WEIGHTS_NAME}{hint}")
    fd = _open_regular(cfg_real, cfg_shown)
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{cfg_shown}: larger than {MAX_CONFIG_BYTES} bytes; not an adapter "
                           "config")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_shown}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_shown}: expected a JSON object, got {type(config).__name__}")
    check_config(config, cfg_shown)
    tensors = read_safetensors(w_real, w_shown)
    keys: dict = {}
    extra: dict = {}
    from pyedge.adapters.base import method_for_peft
    method = method_for_peft(config, cfg_shown)
    is_lora = method.peft_type == "LORA"   # other methods check their own tensors
    lora, whole = split_keys(tensors, shown=w_shown, keys=keys, extra=extra,
                             extra_suffixes=LORA_EXTRA_SUFFIXES + tuple(method.peft_suffixes))
    _check_consistency(config, lora, whole, keys, w_shown, cfg_shown, is_lora)
    for module, ts in extra.items():
        for suffix, arr in ts.items():
            check_values(w_shown, keys[(module, suffix)], arr, float_only=True)
    if is_lora:
        _check_extra(config, lora, extra, keys, w_shown, cfg_shown)
    else:
        method.check_files(config, extra, keys, w_shown, cfg_shown)
    return AdapterFiles(folder, cfg_shown, w_shown, config, tensors, lora, whole, keys, extra)
