// Prompt Anatomy: the words a user types in the node search (double-click the canvas) find the pack's nodes.
// Frontends whose search reads a node definition's search_aliases (1.58 does; 1.32 searches only names) get
// "prompt anatomy" on every pack node plus the words below, added before the definitions are registered.
import { app } from "../../scripts/app.js";

const PACK_WORDS = ["prompt anatomy", "prompt-anatomy"];
const GUIDANCE = ["cfg cutoff", "guidance cutoff", "cfg schedule", "skip cfg late steps", "faster sampling"];
const FREQUENCY = ["frequency", "low pass", "high pass", "low frequency", "high frequency", "fft", "spectral",
                   "band split"];
const TEXT_EDIT = ["text edit", "edit text in image", "typography", "text layers"];
const ATTENTION = ["attention map", "heatmap", "cross attention", "token heatmap", "daam"];

export const SEARCH_ALIASES = {
  GuidanceCutoffKSampler: [...GUIDANCE, "ksampler"],
  GuidanceCutoffGuider: [...GUIDANCE, "guider", "custom sampler"],
  GuidanceCutoffPatch: [...GUIDANCE, "model patch"],
  GuidanceCutoffReport: [...GUIDANCE, "report", "split run"],
  EOSConditioningSwap: ["eos", "eos swap", "end of text token", "conditioning swap", "prompt swap"],
  CrossAttentionCapture: [...ATTENTION, "record attention"],
  CrossAttentionMapViewer: [...ATTENTION, "attention viewer", "shape convergence"],
  TextLayerPatch: [...TEXT_EDIT, "attention patch", "change the rendered text"],
  TextLayerWordSubstitute: [...TEXT_EDIT, "replace word", "word swap"],
  TextLayerLocalize: [...TEXT_EDIT, "find text layers", "localize"],
  LoraLoaderTextLayers: [...TEXT_EDIT, "lora", "lora loader"],
  TextLayerLoraTrain: [...TEXT_EDIT, "lora", "train lora"],
  FrequencySplit: FREQUENCY,
  FrequencySplitImage: [...FREQUENCY, "image"],
  FrequencyMerge: [...FREQUENCY, "merge"],
  FrequencyMergeImage: [...FREQUENCY, "merge", "image"],
  FrequencySplitPreview: [...FREQUENCY, "preview"],
  FrequencySplitViewer: [...FREQUENCY, "viewer", "low frequency first"],
  FrequencyNoisingAnalysis: [...FREQUENCY, "noising", "noise analysis"],
  PromptAnatomyDemoLoader: ["demo model", "tiny model", "cpu model", "loader"],
};

app.registerExtension({
  name: "prompt_anatomy.search",
  addCustomNodeDefs(defs) {
    for (const [name, def] of Object.entries(defs)) {
      if (!String(def?.category ?? "").startsWith("prompt_anatomy")) continue;
      const words = [...(def.search_aliases ?? []), ...PACK_WORDS, ...(SEARCH_ALIASES[name] ?? [])];
      def.search_aliases = [...new Set(words)];
    }
  },
});
