"""Crafted hostile and careless inputs (issue 17), one table shared by tests/test_hostile_inputs.py and by the
before/after measurement (`python tests/hostile_cases.py ROOT`, each case's CLI run in a subprocess).

Each case writes its files into a fresh folder and gives the `vlmrel` argv, the library call that takes the same
input, and the expected outcome: "works" or "error" with the message it must show. Bombs are built from headers
(a 196 Mpx PNG is 200 bytes here), so the suite stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("VLMREL_HOSTILE_ROOT", REPO))  # the tree whose shipped gate/models the CLI uses
QUESTION = "is there a red circle in the image?"


@dataclass
class Scenario:
    argv: list[Any]  # str, or bytes for an argument that is not UTF-8
    library: Callable[[], Any] | None = None
    must_not_exist: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    expect: str  # "works" or "error"
    message: str  # regex the error must match ("" for works)
    build: Callable[[Path], Scenario]
    needs_model: bool = False  # the CLI run loads the tiny model (works cases)


# ------------------------------------------------------------------------------------------------ file builders


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, rows: int | None = None) -> bytes:
    """A greyscale PNG declaring width x height; ``rows`` real rows of pixel data (None: all of them)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width
    body = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def ok_image(tmp: Path, name: str = "ok.png") -> Path:
    path = tmp / name
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def gate_yaml() -> Path:
    return ROOT / "sample_data" / "gates" / "late_fusion" / "gate.yaml"


def write_jsonl(tmp: Path, rows: list[Any], name: str = "d.jsonl", prefix: bytes = b"") -> Path:
    path = tmp / name
    lines = [r if isinstance(r, (bytes, str)) else json.dumps(r) for r in rows]
    path.write_bytes(prefix + b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


def row(image: str = "ok.png", text: str = QUESTION, label: Any = "yes", **extra: Any) -> dict[str, Any]:
    data = {"question_id": extra.pop("question_id", 1), "image": image, "text": text, **extra}
    if label is not None:
        data["label"] = label
    return data


def gate_bundle(tmp: Path, edit: Callable[[str], str] | None = None, raw: bytes | None = None) -> Path:
    """A self-contained copy of the shipped late-fusion bundle (the model copied inside it, so no path leaves the
    folder and ``allow_external_paths`` is dropped) with its YAML edited."""
    bundle = tmp / "bundle"
    shutil.copytree(gate_yaml().parent, bundle)
    shutil.copytree(ROOT / "sample_data" / "models" / "late_fusion", bundle / "model")
    text = (bundle / "gate.yaml").read_text()
    text = text.replace("../../models/late_fusion", "model").replace("  allow_external_paths: true\n", "")
    if edit is not None:
        text = edit(text)
    (bundle / "gate.yaml").write_bytes(raw if raw is not None else text.encode())
    return bundle / "gate.yaml"


# ------------------------------------------------------------------------------------------------ library calls


def _lib_image(path: Path) -> Callable[[], Any]:
    def call() -> Any:
        from vlmrel_core.validation.images import load_image

        return load_image(path)

    return call


_GATE: list[Any] = []


def shared_gate() -> Any:
    if not _GATE:
        from vlmrel_core.gate.bundle import load_gate

        _GATE.append(load_gate(REPO / "sample_data" / "gates" / "late_fusion" / "gate.yaml"))
    return _GATE[0]


def _lib_question(question: Any) -> Callable[[], Any]:
    def call() -> Any:
        return shared_gate().answer(Image.new("RGB", (32, 32), (200, 30, 30)), question)

    return call


def _lib_jsonl(path: Path, require_label: bool, **kwargs: Any) -> Callable[[], Any]:
    def call() -> Any:
        from vlmrel_core.data.loader import load_vqa_jsonl

        return load_vqa_jsonl(path, require_label=require_label, **kwargs)

    return call


def _lib_config(path: Path, components: bool = False) -> Callable[[], Any]:
    def call() -> Any:
        from vlmrel_core.gate.config import load_gate_config
        from vlmrel_core.gate.bundle import load_gate_components

        config = load_gate_config(path)
        if components:
            load_gate_components(config)
        config.model_source()
        return config

    return call


def _lib_model(path: Path) -> Callable[[], Any]:
    def call() -> Any:
        from vlmrel_core.engine.loading import load_vlm

        return load_vlm(path)

    return call


# ------------------------------------------------------------------------------------------------ scenarios


def gate_image(image_builder: Callable[[Path], Path], question: Any = QUESTION) -> Callable[[Path], Scenario]:
    def build(tmp: Path) -> Scenario:
        path = image_builder(tmp)
        return Scenario(["gate", "--config", str(gate_yaml()), "--image", str(path), "--question", question],
                        _lib_image(path))

    return build


def gate_question(question: Any) -> Callable[[Path], Scenario]:
    def build(tmp: Path) -> Scenario:
        path = ok_image(tmp)
        library_question = os.fsdecode(question) if isinstance(question, bytes) else question
        return Scenario(["gate", "--config", str(gate_yaml()), "--image", str(path), "--question", question],
                        _lib_question(library_question))

    return build


def gate_data(rows: list[Any], prefix: bytes = b"", extra: tuple[str, ...] = (), **load: Any) -> Callable[[Path], Scenario]:
    def build(tmp: Path) -> Scenario:
        ok_image(tmp)
        data = write_jsonl(tmp, rows, prefix=prefix)
        out = tmp / "out" / "decisions.jsonl"
        options = dict(load)
        if "--allow-external-paths" in extra:  # the image root is {tmp}/data, the image one level above it
            options.update(image_root=tmp / "data", allow_external_paths=True)
        return Scenario(["gate", "--config", str(gate_yaml()), "--data", str(data), "--out", str(out), *extra],
                        _lib_jsonl(data, False, **options), [out, out.with_name(out.name + ".tmp")])

    return build


def _lib_extract(data: Path, out: Path, **options: Any) -> Callable[[], Any]:
    def call() -> Any:
        from vlmrel_core.engine.extract import extract

        return extract(None, data, out, **options)  # option ranges are checked before the model is touched

    return call


def extract_data(rows: list[Any], prefix: bytes = b"", extra: tuple[str, ...] = (), **options: Any) -> Callable[[Path], Scenario]:
    def build(tmp: Path) -> Scenario:
        ok_image(tmp)
        data = write_jsonl(tmp, rows, prefix=prefix)
        out = tmp / "run"
        model = str(ROOT / "sample_data" / "models" / "late_fusion")
        library = _lib_extract(data, out, **options) if options else _lib_jsonl(data, True)
        return Scenario(["extract", "--model", model, "--data", str(data), "--out", str(out), "--limit", "1", *extra],
                        library, [out])

    return build


def gate_config(edit: Callable[[str], str] | None = None, raw: bytes | None = None, components: bool = False,
                files: Callable[[Path], None] | None = None) -> Callable[[Path], Scenario]:
    def build(tmp: Path) -> Scenario:
        path = gate_bundle(tmp, edit, raw)
        if files is not None:
            files(path.parent)
        image = ok_image(tmp)
        return Scenario(["gate", "--config", str(path), "--image", str(image), "--question", QUESTION],
                        _lib_config(path, components))

    return build


def model_folder(fill: Callable[[Path], None]) -> Callable[[Path], Scenario]:
    def build(tmp: Path) -> Scenario:
        folder = tmp / "model"
        folder.mkdir()
        fill(folder)
        ok_image(tmp)
        data = write_jsonl(tmp, [row()])
        out = tmp / "run"
        return Scenario(["extract", "--model", str(folder), "--data", str(data), "--out", str(out)], _lib_model(folder), [out])

    return build


def _pickle_only(folder: Path) -> None:
    source = ROOT / "sample_data" / "models" / "late_fusion"
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." + b"\x00" * 16)


def _no_weights(folder: Path) -> None:
    for item in (ROOT / "sample_data" / "models" / "late_fusion").iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)


def _save(mode: str, suffix: str, size: tuple[int, int] = (32, 32), **kwargs: Any) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / f"img{suffix}"
        if mode == "P+alpha":
            image = Image.new("P", size, 0)
            image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
            image.save(path, transparency=0)
        elif mode == "GIF3":
            frames = [Image.new("RGB", size, colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
        elif mode == "I;16":
            Image.new("I;16", size, 40000).save(path)
        else:
            Image.new(mode, size).save(path, **kwargs)
        return path

    return build


def _raw(data: bytes | Callable[[], bytes], name: str = "img.png") -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data() if callable(data) else data)
        return path

    return build


def _truncated(tmp: Path) -> Path:
    path = tmp / "full.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    cut = tmp / "truncated.png"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    path.unlink()
    return cut


BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["reliability_monitor: *i"]
)


def _set(key: str, value: str) -> Callable[[str], str]:
    import re

    def edit(text: str) -> str:
        return re.sub(rf"(\b{key}: )[^,}}\n]+", rf"\g<1>{value}", text, count=1)

    return edit


def _external_probe(bundle: Path) -> None:
    (bundle.parent / "elsewhere").mkdir()
    shutil.move(str(bundle / "probe"), str(bundle.parent / "elsewhere" / "probe"))


CASES: list[Case] = [
    # --- images ------------------------------------------------------------------------------------
    Case("png_bomb_196mpx", "image", "error", r"decompression bomb|limit is", gate_image(_raw(lambda: png_bytes(14000, 14000, rows=1)))),
    Case("png_49mpx_real", "image", "error", r"7000 x 7000 .* the limit is", gate_image(_raw(lambda: png_bytes(7000, 7000)))),
    Case("png_truncated", "image", "error", r"damaged or truncated", gate_image(_truncated)),
    Case("not_an_image", "image", "error", r"not an image", gate_image(_raw(b"<svg>hello</svg>"))),
    Case("zero_byte_file", "image", "error", r"not an image", gate_image(_raw(b""))),
    Case("ppm_format", "image", "error", r"PPM images are not accepted", gate_image(_save("RGB", ".ppm"))),
    Case("one_by_one", "image", "error", r"at least 4 pixels", gate_image(_save("RGB", ".png", (1, 1)))),
    Case("extreme_aspect", "image", "error", r"aspect ratio", gate_image(_save("RGB", ".png", (4000, 10)))),
    Case("image_missing", "image", "error", r"image not found", gate_image(lambda tmp: tmp / "missing.png")),
    Case("image_is_a_folder", "image", "error", r"image not found", gate_image(lambda tmp: tmp)),
    Case("gif_three_frames", "image", "works", "", gate_image(_save("GIF3", ".gif")), needs_model=True),
    Case("cmyk_jpeg", "image", "works", "", gate_image(_save("CMYK", ".jpg")), needs_model=True),
    Case("png_16_bit", "image", "works", "", gate_image(_save("I;16", ".png")), needs_model=True),
    Case("palette_alpha", "image", "works", "", gate_image(_save("P+alpha", ".png")), needs_model=True),
    Case("rgba_png", "image", "works", "", gate_image(_save("RGBA", ".png")), needs_model=True),
    # --- questions ---------------------------------------------------------------------------------
    Case("question_empty", "question", "error", r"question is empty", gate_question("")),
    Case("question_whitespace", "question", "error", r"only whitespace", gate_question("   \n\t ")),
    Case("question_10k_chars", "question", "error", r"10,000 characters long", gate_question("x" * 10_000)),
    Case("question_300_tokens", "question", "error", r"tokens long", gate_question("is " * 300)),
    Case("question_escape_char", "question", "error", r"control character", gate_question("is there \x1b[31m red?")),
    Case("question_not_utf8", "question", "error", r"not valid UTF-8", gate_question(b"is there a \xff\xfe circle?")),
    Case("question_image_token", "question", "works", "", gate_question("is there a <image> red circle?"), needs_model=True),
    Case("question_special_tokens", "question", "works", "", gate_question("</s><pad><s> is there a red circle?"), needs_model=True),
    Case("question_unicode", "question", "works", "", gate_question("is there a red circle 🔴 in the imagé?"), needs_model=True),
    # --- JSONL ---------------------------------------------------------------------------------------
    Case("jsonl_bom", "jsonl", "works", "", gate_data([row()], prefix=b"\xef\xbb\xbf"), needs_model=True),
    Case("jsonl_unlabelled_gate", "jsonl", "works", "", gate_data([row(label=None)]), needs_model=True),
    Case("jsonl_not_utf8", "jsonl", "error", r"d.jsonl, line 2: not UTF-8", gate_data([row(), b'{"text": "\xff"}'])),
    Case("jsonl_label_maybe_extract", "jsonl", "error", r"line 1: label 'maybe' is not yes/no", extract_data([row(label="maybe")])),
    Case("jsonl_label_maybe_gate", "jsonl", "error", r"line 1: label 'maybe' is not yes/no", gate_data([row(label="maybe")])),
    Case("jsonl_label_missing_extract", "jsonl", "error", r"line 1: missing label", extract_data([row(label=None)])),
    Case("jsonl_count_label_bad", "jsonl", "error", r"not a count", extract_data([row(label="many", question_type="count")])),
    Case("jsonl_image_dotdot", "jsonl", "error", r"line 1: image: \.\./outside.png points outside", gate_data([row(image="../outside.png")])),
    Case("jsonl_image_absolute", "jsonl", "error", r"line 1: image: /etc/hostname points outside", gate_data([row(image="/etc/hostname")])),
    Case("jsonl_image_external_allowed", "jsonl", "works", "", gate_data([row(image="../ok.png")], extra=("--image-root", "{tmp}/data", "--allow-external-paths")), needs_model=True),
    Case("jsonl_nul_question", "jsonl", "error", r"line 1: the question contains a control character '\\x00'", gate_data([row(text="is there\x00 a circle?")])),
    Case("jsonl_200k_question", "jsonl", "error", r"line 1: the question is 200,000 characters long", gate_data([row(text="y" * 200_000)])),
    Case("jsonl_empty_question", "jsonl", "error", r"line 1: the question is empty", gate_data([row(text="")])),
    Case("jsonl_deep_nesting", "jsonl", "error", r"line 1: (JSON nested too deeply|not valid JSON)", gate_data(["[" * 100_000 + "]" * 100_000])),
    Case("jsonl_bomb_image", "jsonl", "error", r"line 1: .*bomb.png.*(decompression bomb|limit is)", gate_data([row(image="bomb.png")]),),
    # --- YAML / bundle -------------------------------------------------------------------------------
    Case("yaml_billion_laughs", "yaml", "error", r"YAML anchors .* not allowed", gate_config(raw=BILLION_LAUGHS.encode())),
    Case("yaml_duplicate_key", "yaml", "error", r"duplicate YAML key 'max_new_tokens'", gate_config(lambda t: t.replace("  max_new_tokens: 8", "  max_new_tokens: 8\n  max_new_tokens: 9"))),
    Case("yaml_k_100000", "yaml", "error", r"gray_zone_action: .*K <= 64", gate_config(_set("gray_zone_action", "self_consistency_k100000"))),
    Case("yaml_max_new_tokens_1e8", "yaml", "error", r"max_new_tokens: Input should be less than or equal to 512", gate_config(_set("max_new_tokens", "100000000"))),
    Case("yaml_window_1e12", "yaml", "error", r"monitoring.window: Input should be less than", gate_config(_set("window", "1000000000000"))),
    Case("yaml_oversized", "yaml", "error", r"bytes; the limit is 65,536", gate_config(lambda t: t + "#" * 70_000 + "\n")),
    Case("yaml_python_tag", "yaml", "error", r"not valid YAML", gate_config(raw=b"reliability_monitor: !!python/object/apply:os.system ['echo pwned']\n")),
    Case("yaml_not_utf8", "yaml", "error", r"gate.yaml is not UTF-8", gate_config(raw=b"reliability_monitor: \xff\xfe\n")),
    Case("yaml_deep_nesting", "yaml", "error", r"nested too deeply|not valid YAML", gate_config(raw=b"reliability_monitor: " + b"[" * 20_000 + b"]" * 20_000 + b"\n")),
    Case("yaml_probe_path_outside", "yaml", "error", r"probe.path: /etc points outside", gate_config(lambda t: t.replace("path: probe", "path: /etc"), components=True)),
    Case("yaml_calibration_outside", "yaml", "error", r"calibration_file: \.\./\.\./\.\./etc/passwd points outside", gate_config(lambda t: t.replace("calibration_file: calibration.json", "calibration_file: ../../../etc/passwd"), components=True)),
    Case("yaml_model_outside", "yaml", "error", r"model.path: .* points outside", gate_config(lambda t: t.replace("path: model,", f"path: {(ROOT / 'sample_data' / 'models' / 'late_fusion').resolve()},"))),
    Case("yaml_external_allowed", "yaml", "works", "", gate_config(lambda t: t.replace("path: probe", "path: ../elsewhere/probe") + "  allow_external_paths: true\n", components=True, files=_external_probe), needs_model=True),
    Case("calibration_is_pickle", "yaml", "error", r"calibration file .*calibration.json is not UTF-8", gate_config(components=True, files=lambda b: (b / "calibration.json").write_bytes(b"\x80\x04\x95\x10\x00cos\nsystem\n."))),
    Case("calibration_not_json", "yaml", "error", r"calibration file .*calibration.json is not valid JSON", gate_config(components=True, files=lambda b: (b / "calibration.json").write_text("{oops"))),
    Case("probe_tensors_garbage", "probe", "error", r"damaged or not a safetensors file", gate_config(components=True, files=lambda b: next((b / "probe").glob("*.safetensors")).write_bytes(b"\x00" * 64))),
    # --- models --------------------------------------------------------------------------------------
    Case("model_pickle_only", "model", "error", r"only pickled weights \(pytorch_model.bin\)", model_folder(_pickle_only)),
    Case("model_no_weights", "model", "error", r"holds no model weights", model_folder(_no_weights)),
    # --- numeric options -----------------------------------------------------------------------------
    Case("cli_self_consistency_100000", "option", "error", r"must be (an integer )?from 0 to 64", extract_data([row()], extra=("--self-consistency", "100000"), self_consistency_k=100000)),
    Case("cli_max_new_tokens_1e8", "option", "error", r"must be (an integer )?from 1 to 512", extract_data([row()], extra=("--max-new-tokens", "100000000"), max_new_tokens=10**8)),
]


def prepare(case: Case, tmp: Path) -> Scenario:
    """Build a case's files under ``tmp`` (a few cases need extra setup beyond their builder)."""
    if case.name == "jsonl_bomb_image":
        (tmp / "bomb.png").write_bytes(png_bytes(14000, 14000, rows=1))
    scenario = case.build(tmp)
    if case.name == "jsonl_image_external_allowed":
        (tmp / "data").mkdir()
    scenario.argv = [a.replace("{tmp}", str(tmp)) if isinstance(a, str) else a for a in scenario.argv]
    return scenario


def classify(expect: str, returncode: int | None, stderr: str) -> str:
    """works / clear error / crash / hang / wrong success, from one CLI run."""
    if returncode is None:
        return "hang"
    if "Traceback" in stderr or returncode < 0 or returncode in (1, 137):
        return "crash"
    if returncode == 0:
        return "works" if expect == "works" else "wrong success"
    return "clear error"


def measure(python_root: Path, timeout: float = 150.0) -> dict[str, str]:
    """Run every case's CLI in a subprocess against the code in ``python_root``; outcome per case."""
    import subprocess
    import tempfile

    outcomes = {}
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            scenario = prepare(case, Path(folder))
            argv = [sys.executable, "-m", "vlmrel_core.cli.main", *scenario.argv]
            env = {**os.environ, "PYTHONPATH": str(python_root), "OMP_NUM_THREADS": "1"}
            try:
                done = subprocess.run(argv, cwd=python_root, env=env, capture_output=True, timeout=timeout,
                                      preexec_fn=lambda: __import__("resource").setrlimit(
                                          __import__("resource").RLIMIT_AS, (6 << 30, 6 << 30)))
                code, err = done.returncode, done.stderr.decode(errors="replace")
            except subprocess.TimeoutExpired:
                code, err = None, ""
            outcomes[case.name] = classify(case.expect, code, err)
            last = err.strip().splitlines()[-1][:160] if err.strip() else ""
            print(f"{case.name:32s} expect={case.expect:5s} -> {outcomes[case.name]:13s} {last}", flush=True)
    return outcomes


if __name__ == "__main__":
    from collections import Counter

    results = measure(Path(sys.argv[1]).resolve())
    print(json.dumps(Counter(results.values()), indent=1))
