"""locales/: the English nodeDefs.json is what scripts/make_locales.py makes from the node schemas today, and the
hand-written Chinese one covers every node, input and output of it (so a new node, input or tooltip forces a
regeneration and a translation). The frontend loading them is tests/browser/test_locales_browser.py's job."""
from __future__ import annotations

import json
from pathlib import Path

import tiny_models

ROOT = Path(__file__).resolve().parents[2]
ml = tiny_models.load_by_path("pa_make_locales", ROOT / "scripts" / "make_locales.py")
REGENERATE = ".venv/bin/python scripts/make_locales.py"


def test_english_node_defs_are_up_to_date_with_the_schemas():
    built = ml.build_en()
    assert ml.EN_FILE.is_file(), f"{ml.EN_FILE} missing -> {REGENERATE}"
    on_disk = json.loads(ml.EN_FILE.read_text())
    stale = sorted(k for k in set(built) | set(on_disk) if built.get(k) != on_disk.get(k))
    assert not stale, f"locales/en/nodeDefs.json is out of date for {stale} -> {REGENERATE}"
    assert ml.EN_FILE.read_text() == ml.dump(built), f"locales/en/nodeDefs.json is not the generator's output -> {REGENERATE}"


def test_english_node_defs_cover_every_node_input_and_tooltip():
    pack = tiny_models.load_by_path("prompt_anatomy", ROOT / "__init__.py", ROOT)
    import asyncio

    async def nodes():
        return await (await pack.comfy_entrypoint()).get_node_list()

    en = json.loads(ml.EN_FILE.read_text())
    for cls in asyncio.run(nodes()):
        schema = cls.GET_SCHEMA()
        entry = en[schema.node_id]
        assert entry["display_name"] == (schema.display_name or schema.node_id)
        for inp in schema.inputs:
            assert entry["inputs"][inp.id]["tooltip"] == inp.tooltip, (schema.node_id, inp.id)
        assert len(entry.get("outputs", {})) == len(schema.outputs), schema.node_id


def test_chinese_translation_covers_every_node_and_input():
    zh_file = ROOT / "locales" / "zh" / "nodeDefs.json"
    assert zh_file.is_file()
    en, zh = json.loads(ml.EN_FILE.read_text()), json.loads(zh_file.read_text())
    problems = ml.missing_entries(en, zh)
    assert not problems, "locales/zh/nodeDefs.json lacks:\n" + "\n".join(problems)
    # translated, not copied: every display name and tooltip differs from the English and contains CJK text
    for node, entry in zh.items():
        texts = [entry["display_name"]] + [i["tooltip"] for i in entry["inputs"].values()]
        for text in texts:
            assert any("\u4e00" <= ch <= "\u9fff" for ch in text), (node, text)


def test_missing_entries_names_what_is_missing():
    en = {"N": {"display_name": "N", "inputs": {"a": {"name": "a", "tooltip": "t"}}, "outputs": {"0": {"name": "X"}}}}
    zh = {"N": {"display_name": "节点", "inputs": {"a": {"name": "甲"}, "old": {"name": "旧"}}}, "Gone": {}}
    assert ml.missing_entries(en, zh) == ["N.inputs.a.tooltip: missing", "N.inputs.old: not in the English file (stale)",
                                          "N.outputs.0.name: missing", "Gone: not a node of the pack (stale)"]
    assert ml.missing_entries(en, {}) == ["N: missing"]
