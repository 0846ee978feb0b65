// Prompt Anatomy: shows each node's text report (the ui "text" of its last run) inside the node.
// Applies to the pack's nodes that have a STRING output (reports, token tables, summaries).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "prompt_anatomy_report";

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
      if (widget.inputEl) {
        widget.inputEl.readOnly = true;
        widget.inputEl.placeholder = "report appears here after a run";
      }
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null) return;
      const widget = this.widgets?.find((w) => w.name === WIDGET);
      if (widget) widget.value = Array.isArray(text) ? text.join("\n") : String(text);
    };
  },
});
