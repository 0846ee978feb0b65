// Prompt Anatomy: shows each node's text report (the ui "text" of its last run) inside the node.
// Applies to the pack's nodes that have a STRING output (reports, token tables, summaries).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "prompt_anatomy_report";
const MAX_GROWTH = 600; // px a report may add to its node; a longer one scrolls inside the text box
const FRAMES = 10; // fit tries on the frames after a run
const POLLS = 100; // then tries every POLL_MS (about 30 s) until the node's text box is drawn
const POLL_MS = 300;

// The text box that shows the report, and the node height growth starts from.
function reportBox(node, widget) {
  const own = widget.element ?? widget.inputEl;
  if (own?.isConnected) return { el: own, height: node.size[1] };
  // Nodes 2.0 draws the node in the DOM with a text box of its own; the node's body may be taller than
  // node.size (its content's minimum height), so growth starts from the height it is drawn at
  const nodeEl = document.querySelector(`[data-node-id="${node.id}"]`);
  const el = nodeEl && [...nodeEl.querySelectorAll("textarea")].find((t) => t.value === widget.value);
  if (!el) return null;
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  return { el, vue: true, height: Math.max(node.size[1], nodeEl.offsetHeight - title) };
}

// Grow the node by the part of the report its text box hides (up to MAX_GROWTH), so a short report is read
// whole without resizing by hand; the node never shrinks, so a size the user chose stays. Nodes with an IMAGE
// output are left alone (their images take the height).
// Returns false while there is more to do: the text box is not laid out yet (node off screen) or it has not
// caught up with the last growth; tried again on the next frames, canvas draws and a slow poll.
function fitReport(node, widget) {
  const box = reportBox(node, widget);
  const el = box?.el;
  if (!el?.isConnected || el.clientHeight === 0) return false;
  if (node.paWaitFrom === el.clientHeight) {
    // the box has not followed the last growth yet; Nodes 2.0 of some frontends (1.32) never does (its nodes
    // keep their drawn size): there the text box takes the height and the node follows its content
    node.paWaits = (node.paWaits ?? 0) + 1;
    if (box.vue && node.paWaits > 2) el.style.minHeight = `${el.clientHeight + node.paLastGrow}px`;
    return false;
  }
  const hidden = el.scrollHeight - el.clientHeight;
  const room = MAX_GROWTH - (node.paGrown ?? 0);
  if (hidden <= 1 || room <= 0) return true;
  const grow = Math.min(hidden, room);
  node.paGrown = (node.paGrown ?? 0) + grow;
  node.paWaitFrom = el.clientHeight;
  node.paLastGrow = grow;
  node.paWaits = 0;
  node.setSize([node.size[0], box.height + grow]);
  node.setDirtyCanvas?.(true, true);
  return false;
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
      this.paGrown = 0;
      this.paWaitFrom = undefined;
      // the next frames first; then a slow poll, for Nodes 2.0 (no canvas draw calls) drawing the node later
      const tryFit = (tries) => {
        if (!this.paFitPending) return;
        if (fitReport(this, widget)) this.paFitPending = false;
        else if (tries > POLLS) requestAnimationFrame(() => tryFit(tries - 1));
        else if (tries > 0) setTimeout(() => tryFit(tries - 1), POLL_MS);
      };
      tryFit(POLLS + FRAMES);
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
