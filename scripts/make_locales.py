"""Write locales/en/nodeDefs.json from the pack's node schemas, and check locales/<lang>/nodeDefs.json against it.

    .venv/bin/python scripts/make_locales.py           # regenerate locales/en/nodeDefs.json
    .venv/bin/python scripts/make_locales.py --check   # exit 1 if en is stale or another language misses an entry

ComfyUI serves every custom node folder's ``locales/<lang>/nodeDefs.json`` (with main.json and the other
locale files) at GET /i18n (app/custom_node_manager.py); the frontend merges it into its own messages and looks
up ``nodeDefs.<node id>.display_name``, ``.description``, ``.inputs.<input>.name`` / ``.tooltip`` and
``.outputs.<index>.name`` / ``.tooltip`` (ids with "." written as "_"), falling back to the server's English.

The English file is generated, never edited: ComfyUI is imported in-process (CPU), the pack is loaded by file
location as ComfyUI loads it, and every node of the extension that ``comfy_entrypoint`` returns is described by
its own V1 node info (what /object_info sends the frontend). Nothing here knows the pack's module layout.
Other languages are written by hand; ``missing_entries`` lists what one lacks (a unit test keeps both honest).

main.json (written by hand, en and zh) holds only the template browser's label for the pack's workflows,
``templateWorkflows.category.<custom_nodes folder>``: the one template string a pack can set in frontends
1.32.9 and 1.58.1 (card titles are the file names there). Category segments are not translated:
``nodeCategories`` keys are one namespace shared with core ComfyUI and every other pack (translating "loaders"
would retranslate core's), and a translated "prompt_anatomy" would change the ``nodeData.category`` that
js/prompt_anatomy.js matches on.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCALES = ROOT / "locales"
EN_FILE = LOCALES / "en" / "nodeDefs.json"
PACKAGE = "prompt_anatomy"  # the name the tests load the pack under (tests/unit/conftest.py)


def i18n_key(name: str) -> str:
    """The frontend's normalizeI18nKey: "." would split the message path, so it becomes "_"."""
    return name.replace(".", "_")


def _load_pack():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import comfy_path
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    comfy_path.bootstrap_comfy()
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def node_classes() -> list[type]:
    """Every node class of the extension that the pack's comfy_entrypoint returns."""
    pack = _load_pack()

    async def _nodes():
        extension = await pack.comfy_entrypoint()
        return await extension.get_node_list()

    return list(asyncio.run(_nodes()))


def describe(info: dict) -> dict:
    """One node's nodeDefs entry from its V1 node info (the /object_info entry)."""
    entry: dict = {"display_name": info.get("display_name") or info["name"]}
    if info.get("description"):
        entry["description"] = info["description"]
    inputs = {}
    for section in ("required", "optional"):
        for name, spec in (info.get("input") or {}).get(section, {}).items():
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            item = {"name": opts.get("display_name") or name}
            if opts.get("tooltip"):
                item["tooltip"] = opts["tooltip"]
            inputs[i18n_key(name)] = item
    if inputs:
        entry["inputs"] = inputs
    outputs = {}
    names = info.get("output_name") or info.get("output") or []
    tooltips = info.get("output_tooltips") or []
    for i, name in enumerate(names):
        item = {"name": name}
        if i < len(tooltips) and tooltips[i]:
            item["tooltip"] = tooltips[i]
        outputs[str(i)] = item
    if outputs:
        entry["outputs"] = outputs
    return entry


def build_en() -> dict:
    """{node id: entry} for every node of the pack, sorted by node id."""
    out = {}
    for cls in node_classes():
        info = cls.GET_NODE_INFO_V1()
        out[i18n_key(info["name"])] = describe(info)
    return dict(sorted(out.items()))


def dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# What every translation must have; the rest (descriptions, output tooltips) falls back to English when absent.
REQUIRED = {"inputs": ("name", "tooltip"), "outputs": ("name",)}


def missing_entries(en: dict, other: dict) -> list[str]:
    """What a hand-written translation lacks: every node, its display name, each input's name and tooltip and
    each output's name (paths like "Node.inputs.cfg.tooltip"). Keys the English file does not have are listed
    too, since they translate nothing (a renamed input, a removed node)."""
    problems = []
    for node, entry in en.items():
        tr = other.get(node)
        if not isinstance(tr, dict):
            problems.append(f"{node}: missing")
            continue
        if not str(tr.get("display_name") or "").strip():
            problems.append(f"{node}.display_name: missing")
        for section, keys in REQUIRED.items():
            for name, item in entry.get(section, {}).items():
                got = (tr.get(section) or {}).get(name) or {}
                for key in keys:
                    if key in item and not str(got.get(key) or "").strip():
                        problems.append(f"{node}.{section}.{name}.{key}: missing")
            for name in (tr.get(section) or {}):
                if name not in entry.get(section, {}):
                    problems.append(f"{node}.{section}.{name}: not in the English file (stale)")
    problems += [f"{node}: not a node of the pack (stale)" for node in other if node not in en]
    return problems


def check() -> list[str]:
    en = build_en()
    problems = []
    if not EN_FILE.is_file() or EN_FILE.read_text() != dump(en):
        problems.append(f"{EN_FILE.relative_to(ROOT)} is out of date with the node schemas -> "
                        ".venv/bin/python scripts/make_locales.py")
    for path in sorted(LOCALES.glob("*/nodeDefs.json")):
        if path.parent.name != "en":
            problems += [f"{path.relative_to(ROOT)}: {p}" for p in missing_entries(en, json.loads(path.read_text()))]
    return problems


def main(argv: list[str]) -> int:
    if "--check" in argv:
        problems = check()
        print("\n".join(problems) if problems else "locales up to date", file=sys.stderr)
        return 1 if problems else 0
    en = build_en()
    EN_FILE.parent.mkdir(parents=True, exist_ok=True)
    EN_FILE.write_text(dump(en))
    print(f"wrote {EN_FILE.relative_to(ROOT)}: {len(en)} nodes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
