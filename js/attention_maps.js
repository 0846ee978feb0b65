// Prompt Anatomy: token picker of the Cross-Attention Map Viewer.
// After a run the node lists the prompt's tokens (ui "pa_tokens") as chips; clicking a chip adds or removes it
// in the node's "tokens" input, so the choice is an ordinary widget value (saved with the workflow) and the
// heat maps shown in the node change on the next run. The last token list is kept in node.properties, so the
// chips come back after a reload.
import { app } from "../../scripts/app.js";

const NODE = "CrossAttentionMapViewer";
const PICKER = "pa_token_picker";
const COLORS = {
  "[SOS]": "#787878",
  semantic: "#1f77b4",
  "[EOS]": "#d62728",
  padding: "#ff7f0e",
  "[image]": "#2ca02c",
};

function tokensWidget(node) {
  return node.widgets?.find((w) => w.name === "tokens");
}

function parseItems(value) {
  const text = String(value ?? "").trim().toLowerCase();
  if (text === "" || text === "auto") return null; // automatic choice
  return text.split(/[,;]/).map((s) => s.trim()).filter((s) => s.length > 0);
}

function currentItems(node) {
  const chips = node.properties?.pa_tokens ?? [];
  const items = parseItems(tokensWidget(node)?.value);
  if (items !== null) return items;
  return chips.filter((c) => c.auto).map((c) => c.item);
}

function position(item) {
  const n = parseInt(String(item).split("-")[0], 10);
  return Number.isNaN(n) ? Infinity : n;
}

function setItems(node, items) {
  const widget = tokensWidget(node);
  if (!widget) return;
  items.sort((a, b) => position(a) - position(b)); // reading order; class words (sos, img...) last
  widget.value = items.length ? items.join(", ") : "auto";
  widget.callback?.(widget.value);
  node.setDirtyCanvas?.(true, true);
  render(node);
}

function chip(text, title, color, selected, onClick) {
  const el = document.createElement("span");
  el.className = "pa-token-chip" + (selected ? " pa-selected" : "");
  el.textContent = text;
  el.title = title;
  Object.assign(el.style, {
    display: "inline-block",
    margin: "2px",
    padding: "1px 6px",
    borderRadius: "9px",
    border: `1px solid ${color}`,
    background: selected ? color : "transparent",
    color: selected ? "#fff" : "var(--input-text, #ddd)",
    cursor: "pointer",
    fontSize: "11px",
    lineHeight: "16px",
    userSelect: "none",
    whiteSpace: "nowrap",
  });
  el.addEventListener("pointerdown", (e) => e.stopPropagation());
  el.addEventListener("click", (e) => {
    e.preventDefault();
    e.stopPropagation();
    onClick();
  });
  return el;
}

function render(node) {
  const root = node.paPickerEl;
  if (!root) return;
  root.replaceChildren();
  const chips = node.properties?.pa_tokens ?? [];
  if (!chips.length) {
    const hint = document.createElement("div");
    hint.textContent = "Run the workflow once: the prompt's tokens appear here to pick.";
    Object.assign(hint.style, { fontSize: "11px", opacity: "0.7", padding: "2px 4px" });
    root.appendChild(hint);
    return;
  }
  const explicit = parseItems(tokensWidget(node)?.value) !== null;
  const chosen = new Set(currentItems(node));
  root.appendChild(
    chip("auto", "Every semantic token and the first [EOS] of each chunk", "#888", !explicit, () => setItems(node, []))
  );
  for (const c of chips) {
    const weight = c.weight !== 1 && c.weight != null ? ` · weight ${c.weight}` : "";
    const title = `${c.class} · position ${c.item}${c.chunk >= 0 ? ` · chunk ${c.chunk + 1}` : ""}${weight}`;
    const label = c.class === "padding" || c.class === "[image]" ? c.label : `${c.item} ${c.label}`;
    root.appendChild(
      chip(label, title, COLORS[c.class] ?? "#888", chosen.has(c.item), () => {
        const items = currentItems(node);
        const at = items.indexOf(c.item);
        if (at >= 0) items.splice(at, 1);
        else items.push(c.item);
        setItems(node, items);
      })
    );
  }
}

app.registerExtension({
  name: "prompt_anatomy.attention_maps",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.properties = this.properties ?? {};
      const el = document.createElement("div");
      el.className = "pa-token-picker";
      Object.assign(el.style, { overflowY: "auto", maxHeight: "140px", padding: "2px" });
      this.paPickerEl = el;
      this.addDOMWidget(PICKER, "pa_token_picker", el, {
        serialize: false,
        hideOnZoom: false,
        getValue: () => undefined,
        setValue: () => {},
        getMinHeight: () => 44,
        getMaxHeight: () => 150,
      });
      const widget = tokensWidget(this);
      if (widget) {
        const callback = widget.callback;
        const node = this;
        widget.callback = function () {
          const out = callback?.apply(this, arguments);
          render(node);
          return out;
        };
      }
      render(this);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const chips = message?.pa_tokens;
      if (Array.isArray(chips)) {
        this.properties = this.properties ?? {};
        this.properties.pa_tokens = chips;
        render(this);
      }
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      render(this);
      return r;
    };
  },
});
