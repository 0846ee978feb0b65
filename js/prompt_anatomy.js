// Prompt Anatomy: shows each node's text report (the ui "text" of its last run) inside the node.
// Applies to the pack's nodes that have a STRING output (reports, token tables, summaries).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "prompt_anatomy_report";
const MAX_GROWTH = 600; // px a report may add to its node; a longer one scrolls inside the text box

// Grow the node by the part of the report its text box hides (up to MAX_GROWTH), so a short report is read
// whole without resizing by hand; the node never shrinks, so a size the user chose stays. Nodes with an IMAGE
// output are left alone (their images take the height).
// Returns false while the text box is not laid out (node off screen), to be tried again when drawn.
function fitReport(node, widget) {
  const el = widget.element ?? widget.inputEl;
  if (!el?.isConnected || el.clientHeight === 0) return false;
  const hidden = el.scrollHeight - el.clientHeight;
  if (hidden > 1) {
    node.setSize([node.size[0], node.size[1] + Math.min(hidden, MAX_GROWTH)]);
    node.setDirtyCanvas?.(true, true);
  }
  return true;
}

app.registerExtension({
  name: "prompt_anatomy.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData.category ?? "").startsWith("prompt_anatomy")) return;
    if (!(nodeData.output ?? []).includes("STRING")) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
      // display only: neither saved in the workflow nor sent with the prompt (graphToPrompt skips
      // widgets whose options.serialize is false; a changing report would otherwise defeat the cache)
      widget.serialize = false;
      widget.options.serialize = false;
      widget.options.read_only = true;
      const el = widget.element ?? widget.inputEl;
      if (el) {
        el.readOnly = true;
        el.placeholder = "report appears here after a run";
      }
      return r;
    };

    // nodes that also preview images share their height between the text box and the images: left as they are
    const fits = !(nodeData.output ?? []).includes("IMAGE");
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null) return;
      const widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) return;
      widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      if (!fits) return;
      this.paFitPending = true;
      requestAnimationFrame(() => { if (fitReport(this, widget)) this.paFitPending = false; });
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function () {
      const r = onDrawForeground?.apply(this, arguments);
      if (this.paFitPending) {
        const widget = this.widgets?.find((w) => w.name === WIDGET);
        if (!widget || fitReport(this, widget)) this.paFitPending = false;
      }
      return r;
    };
  },
});
