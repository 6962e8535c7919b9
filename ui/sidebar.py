"""The sidebar: model and calibration, the pruning method and its settings, and the action buttons.

Control values go to ``comp_core.settings.settings_for`` (the same parsing as the command line's): methods
whose settings are COMP's ``CompConfig`` (comp and its ablations) take every COMP control, every other method
takes the target ratio and/or the sparsity pattern, whichever of the two its settings have (mask methods: the
sparsity; composed methods: both); its other settings are the registry's defaults. The registry decides, not
a list of method names. "Layer shares" (``allocation``: the method's own per-layer rule, or the searched one of
``comp_core.methods.search``) and its generations apply to every method whose registry entry is ``searchable``,
except a mask pattern N:M, which leaves no per-layer share to search (``search_refusal`` says why in a line).
"""
from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import gradio as gr
from gradio import component_meta

from comp_core import CompConfig, DataError, ModelLoadError, UnsupportedModelError, count_parameters, settings
from comp_core.models.adapters import count_block_parameters
from comp_core.runtime import ratio_over, ratio_over_all
from comp_core.data import default_calibration_size
from comp_core.methods import get_method, make_settings, method_names, setting_names
from comp_core.methods.search.settings import SearchSettings
from comp_core.math.scoring import SCORES
from comp_core.math.sparsity import SparsityPattern

from . import common
from .session import Session

CALIB_CHOICES = [("C4 (train)", "c4"), ("WikiText-2", "wikitext2"), ("PTB", "ptb"),
                 ("Data-free (sampled from the model)", "data-free"), ("Sample text (shipped)", "sample"),
                 ("Local file…", "file")]
DEFAULT_SCORE = CompConfig().score  # the core's measured default
SCORE_LABELS = {"diag": "diag — ‖W_j‖²·‖X_j‖²", "obs": "obs — error after re-tuning",
                "obs-greedy": "obs-greedy — sequential OBS with updates (slow)",
                "cond": "cond — condition-number sensitivity", "fisher": "fisher — loss Fisher information",
                "magnitude": "magnitude — weights only", "activation": "activation — inputs only"}
SCORE_LABELS[DEFAULT_SCORE] = SCORE_LABELS.get(DEFAULT_SCORE, DEFAULT_SCORE) + " (default)"
DEFAULT_METHOD = "comp"
SPARSITY_CHOICES = [("0.5 — half of every linear's weights", "0.5"), ("2:4 — 2 zeros in every 4 weights", "2:4"),
                    ("4:8 — 4 zeros in every 8 weights", "4:8")]
DEFAULT_SPARSITY = "0.5"
MAX_REMOVE = 8
RATIO_MAX = 0.8  # the slider's range: beyond it COMP's quality on small models is of no use
DEFAULT_DEPTH = 0  # what-if material only when asked for: Analyse costs what a prune does
DEFAULT_DENSE_KINDS = CompConfig().dense_kinds  # the core's measured default (None would mean every dense)
DEFAULT_REMOVE = CompConfig().remove_layers if isinstance(CompConfig().remove_layers, int) else 0  # "min": 0 here
# how much of the target each layer takes: the method's own rule, or searched (comp_core.methods.search)
ALLOCATION_CHOICES = [("each method's rule (fast)", "one-shot"),
                      ("searched against the original's answers (slower)", "search")]
DEFAULT_ALLOCATION = SearchSettings().allocation
DEFAULT_GENERATIONS = SearchSettings().search_generations  # the core's default budget
MAX_GENERATIONS = 500


# ------------------------------------------------------------------------------------------- settings


def _no_stub(*_args) -> None:
    """Gradio writes a ``.pyi`` stub beside the module of every component subclass as the class is created
    (``gradio.component_meta.create_or_modify_pyi``): into the source tree, or failing where it is read-only."""


with mock.patch.object(component_meta, "create_or_modify_pyi", _no_stub):
    class RatioSlider(gr.Slider):
        """The target-ratio slider. Gradio's slider refuses a typed value outside its range with a traceback in
        the server log, leaving box and slider apart; this one hands the handlers the value brought back into
        range, and ``ratio_typed`` puts the box back in step and says why. Drawn by Gradio's own slider (a
        template). Replacing one instance's ``preprocess`` does not reach the copies Gradio runs per session."""

        is_template = True

        def preprocess(self, payload):
            if payload is None:
                return None
            return min(max(float(payload), self.minimum), self.maximum)


def ratio_typed(ratio, typed):
    """(slider, warning) after a person typed ``typed`` into the ratio box: the slider's in-range ``ratio``
    written back when they differ, with one line saying why; nothing changes for a value in range."""
    try:
        typed = float(typed)
    except (TypeError, ValueError):
        return gr.update(value=ratio), "<div class='cx-error'>Type a number such as 0.2 for 20 %.</div>"
    if abs(typed - float(ratio)) < 1e-9:
        return gr.update(), ""
    limit = "highest target this app offers" if typed > ratio else "lowest target"
    return (gr.update(value=ratio),
            f"<div class='cx-error'>{typed:g} is beyond the {limit} ({ratio:.0%}): the target is set to "
            f"{ratio:.0%}. A target is the share of the parameters to remove, so it lies between 0 and "
            f"{RATIO_MAX:.0%} here.</div>")



def default_protected(n_layers: int) -> list[int]:
    return sorted(CompConfig().protected_layers(n_layers))


def default_kinds(all_kinds: list[str]) -> list[str]:
    return list(all_kinds) if DEFAULT_DENSE_KINDS is None else [k for k in all_kinds if k in DEFAULT_DENSE_KINDS]


def uses_comp_controls(method: str) -> bool:
    """Whether ``method``'s settings are COMP's, so every COMP control applies to it."""
    return settings.uses_comp_settings(method)


def protected_value(session: Session, protected) -> tuple[int, ...] | None:
    """The dropdown's layers checked against the session's model, or None (the core default) before a model
    filled it; a layer the model lacks is refused (``SettingsError``), not dropped."""
    if protected is None or session.loaded is None:
        return None
    return settings.parse_layers(protected, common.n_layers(session))


def comp_controls(session: Session, n_remove, auto, score, mask_tuning, inputs, dense_kinds,
                  depth=DEFAULT_DEPTH) -> dict:
    """COMP's fields from its controls (dense kinds against the session's model); an empty score or input
    mode leaves the method's default."""
    chosen = dict(remove_layers="auto" if auto else int(n_remove), mask_tuning=bool(mask_tuning),
                  auto_max_layers=int(depth) or CompConfig().auto_max_layers,  # 0: measure nothing ahead
                  **settings.chosen_dense_kinds(dense_kinds, common.dense_kinds(session)))
    chosen.update({k: v for k, v in (("score", score), ("inputs", inputs)) if v})
    return chosen


def uses(method: str, setting: str) -> bool:
    """Whether ``method``'s settings have the field ``setting`` ("ratio", "sparsity")."""
    return setting in setting_names(method)


def model_shares(session: Session) -> tuple[int, int] | None:
    """(all parameters, decoder-block parameters) of the session's model, or None before one is loaded."""
    if session.loaded is None:
        return None
    model = session.loaded.model
    return count_parameters(model), count_block_parameters(model)


def ratio_of_all(session: Session, ratio, ratio_of: str | None = "all") -> float:
    """The slider's ratio as the share of *all* parameters the core works with: unchanged for "all", times the
    blocks' share of the model for "blocks" (``comp_core.runtime.ratio_over_all``)."""
    value = settings.parse_ratio(ratio)
    ratio_of = ratio_of or "all"
    if ratio_of == "all":
        return value
    shares = model_shares(session)
    if shares is None:
        raise settings.SettingsError("load a model first: a ratio of the transformer blocks depends on its size")
    return ratio_over_all(value, ratio_of, *shares)


def ratio_note(session: Session, ratio, ratio_of: str | None = "all") -> str:
    """One line under the slider: what the ratio means for the loaded model in both shares."""
    shares = model_shares(session)
    try:
        value = settings.parse_ratio(ratio)
    except settings.SettingsError as err:
        return f"<div class='cx-error'>{err}</div>"
    if shares is None:
        return ("<div class='cx-help'>Load a model to see what this share means in parameters.</div>"
                if ratio_of == "blocks" else "")
    total, blocks = shares
    of_all = ratio_over_all(value, ratio_of or "all", total, blocks)
    return (f"<div class='cx-help'>= {of_all:.1%} of all {common.millions(total)} parameters · "
            f"{ratio_over('blocks', of_all, total, blocks):.1%} of the {common.millions(blocks)} in the transformer "
            f"blocks (the rest is the vocabulary table and output head, which pruning keeps)</div>")


def search_refusal(method, sparsity=None) -> str:
    """Why ``method`` (at the sparsity pattern ``sparsity``, for methods that have one) has no layer shares to
    search, in a person's words; "" when it has. A pattern that does not parse is left to the run to refuse."""
    method = method or DEFAULT_METHOD
    entry = get_method(method)
    if not entry.method.searchable:
        return f"{method} has no per-layer shares to search, so it always uses its own rule."
    if getattr(make_settings(method), "granularity", None) == "layers":
        return f"{method} removes whole layers only, so there is no per-layer share to search."
    if uses(method, "sparsity") and sparsity not in (None, ""):
        try:
            pattern = settings.parse_sparsity(sparsity)
        except settings.SettingsError:
            return ""
        if SparsityPattern.parse(pattern).is_nm:
            return (f"the {pattern} pattern zeroes the same number of weights in every small group, so there is "
                    "no per-layer share to search: choose a share such as 0.5 to search.")
    return ""


def search_values(method, allocation, generations, sparsity=None, *, auto=False, inputs=None) -> dict:
    """The settings fields of the "Layer shares" controls: {} for the method's own rule, and for a method with
    nothing to search (its controls are hidden then and a line says why: ``search_refusal``); else
    ``allocation="search"`` and the generations (a whole number in 1..MAX_GENERATIONS, refused otherwise).
    COMP's controls that a search cannot work with are refused in the sidebar's words (``auto``, ``inputs``)."""
    if (allocation or DEFAULT_ALLOCATION) != "search" or search_refusal(method, sparsity):
        return {}
    try:
        count = float(generations if generations not in (None, "") else DEFAULT_GENERATIONS)
        if not count.is_integer() or not 1 <= count <= MAX_GENERATIONS:
            raise ValueError
    except (TypeError, ValueError):
        raise settings.SettingsError(f"search generations: type a whole number from 1 to {MAX_GENERATIONS} "
                                     f"(got '{generations}')") from None
    if uses_comp_controls(method or DEFAULT_METHOD):
        if auto:
            raise settings.SettingsError("searched layer shares start from a fixed number of removed layers: "
                                         "untick 'auto' next to Layers to remove, or use each method's rule")
        if inputs == "paired":
            raise settings.SettingsError("searched layer shares prune every layer on the original model's inputs: "
                                         "choose identical or accumulated inputs (Advanced), or use each method's "
                                         "rule")
    return {"allocation": "search", "search_generations": int(count)}


def method_settings(session: Session, method, ratio, n_remove, auto, protected, score, mask_tuning, inputs,
                    dense_kinds, depth=DEFAULT_DEPTH, sparsity=None, ratio_of="all", allocation=None,
                    generations=None):
    """The settings dataclass ``method`` runs with (``comp_core.settings.settings_for``): its registered
    defaults, then the controls that apply (``sparsity`` None or empty: the method's default pattern;
    ``allocation``/``generations``: the "Layer shares" controls, ``search_values``). The ratio is converted to
    the share of all parameters here (``ratio_of``), so everything after sees one basis."""
    method = method or DEFAULT_METHOD
    ratio = ratio_of_all(session, ratio, ratio_of)
    search = search_values(method, allocation, generations, sparsity, auto=auto, inputs=inputs)
    if uses_comp_controls(method):
        return settings.settings_for(method, ratio=ratio, protected=protected_value(session, protected),
                                     comp=comp_controls(session, n_remove, auto, score, mask_tuning, inputs,
                                                        dense_kinds, depth), values=search)
    if uses(method, "sparsity") and sparsity not in (None, ""):
        sparsity = settings.parse_sparsity(sparsity)  # the GUI refuses a sparsity of 0 (it masks nothing)
    return settings.settings_for(method, ratio=ratio, sparsity=sparsity, values=search)


def check_protected(session: Session, protected):
    """(dropdown, note) for what a person typed as protected layers: entries that are not layer numbers of
    this model are taken out and named; the rest stay (as numbers)."""
    kept, refused = [], []
    for entry in protected or []:
        try:
            kept += list(settings.parse_layers([entry], common.n_layers(session)))
        except settings.SettingsError as err:
            refused.append(str(err))
    if not refused:
        # the corrected value coming back as a change keeps the note; any other change clears it
        echo, session.protected_fixed = session.protected_fixed == kept, None
        return gr.update(), gr.update() if echo else ""
    session.protected_fixed = sorted(set(kept))
    return (gr.update(value=session.protected_fixed),
            "<div class='cx-error'>Not protected: " + "; ".join(refused) + ".</div>")


def method_choices() -> list[tuple[str, str]]:
    return [(name, name) for name in method_names()]


def method_note(method) -> str:
    """The chosen method's summary and which controls apply to it."""
    method = method or DEFAULT_METHOD
    entry = get_method(method)
    if uses_comp_controls(method):
        which = "The COMP settings below apply."
    elif uses(method, "ratio") and uses(method, "sparsity"):
        which = ("The target ratio (removed first, with the structured method's defaults) and the sparsity "
                 "(masks on what is left) apply. <b>Analyse</b> always shows COMP's plan.")
    elif uses(method, "sparsity"):
        which = ("Only the sparsity applies: it zeroes weights inside every linear but removes none, so the "
                 "parameter count stays (2:4 can run faster on sparse tensor cores). <b>Analyse</b> always "
                 "shows COMP's plan.")
    else:
        which = ("Only the target ratio applies; its other settings are the method's defaults. "
                 "<b>Analyse</b> always shows COMP's plan.")
    return f"<div class='cx-help'><b>{entry.name}</b> ({entry.kind}): {entry.summary}. {which}</div>"


def search_controls(method, sparsity=None, allocation=None):
    """(Layer shares radio, generations box, note) for the chosen method, pattern and choice: both controls
    only where the method has shares to search (else a line says why), the generations only when searching."""
    refusal = search_refusal(method, sparsity)
    if refusal:
        return (gr.update(visible=False), gr.update(visible=False),
                f"<div class='cx-help'><b>Layer shares</b>: {refusal}</div>")
    searched = (allocation or DEFAULT_ALLOCATION) == "search"
    note = ("<div class='cx-help'>Prune tries other shares layer by layer and keeps the ones whose next-word "
            "predictions stay closest to the original model's on held-out calibration text: a few minutes more "
            "on a CPU. <b>Analyse</b> shows the rule's plan.</div>") if searched else ""
    return gr.update(visible=True), gr.update(visible=searched), note


def select_method(method):
    """(method note, COMP controls group, ratio slider, sparsity dropdown) for the method dropdown: each
    control shows when the method's settings have it (Analyse keeps the hidden ratio)."""
    method = method or DEFAULT_METHOD
    return (method_note(method), gr.update(visible=uses_comp_controls(method)),
            gr.update(visible=uses(method, "ratio")), gr.update(visible=uses(method, "sparsity")))


# -------------------------------------------------------------------------------------------- loading


def control_updates(session: Session, keep_protected=None, keep_kinds=None):
    """Dropdown / checkbox / slider updates once a model is known (layer count, dense kinds)."""
    n = common.n_layers(session)
    kinds = common.dense_kinds(session)
    protected = default_protected(n) if keep_protected is None else sorted(int(p) for p in keep_protected)
    chosen_kinds = default_kinds(kinds) if not keep_kinds else [k for k in keep_kinds if k in kinds]
    candidates = n - len(protected)
    return (gr.update(choices=[(f"layer {i}", i) for i in range(n)], value=protected),
            gr.update(choices=kinds, value=chosen_kinds),
            gr.update(maximum=max(1, min(MAX_REMOVE, candidates))))


@common.user_errors
def load(session: Session, source, calib, calib_file, n_samples, seq_len, seed, progress=gr.Progress()):
    """Load the model and the calibration samples; returns (model card, protected, dense kinds, remove slider)."""
    bridge = common.Bridge(progress, session)
    with common.exclusive(session):
        try:
            common.ensure_model(session, source, bridge)
            common.ensure_samples(session, calib, calib_file, n_samples, seq_len, seed, bridge)
        except (ModelLoadError, DataError, UnsupportedModelError, ValueError) as err:
            gr.Warning(common.message(err), title="Cannot load")
            return common.model_card(session, common.message(err)), gr.update(), gr.update(), gr.update()
        changed = not session.controls_filled()
    protected, kinds, slider = control_updates(session)
    if not changed:  # same model: keep what the user chose
        protected, kinds = gr.update(), gr.update()
    session.controls_key = session.model_key
    return common.model_card(session), protected, kinds, slider


def unfilled_defaults(session: Session, protected, dense_kinds):
    """(protected, dense kinds) as the controls will show them: the model's defaults while the controls were
    never filled for it (a model loaded by Prune or Compare leaves them empty), else the values given."""
    if session.loaded is None or session.controls_filled():
        return protected, dense_kinds
    return default_protected(common.n_layers(session)), default_kinds(common.dense_kinds(session))


# --------------------------------------------------------------------------------------------- layout


def build(default_source: str = "bundled", default_calib: str = "c4") -> SimpleNamespace:
    c = SimpleNamespace()
    default_calib = common.default_calibration(default_calib)  # c4 without a local copy: data-free
    gr.HTML("<div class='cx-h3'>Model</div>")
    c.source = gr.Textbox(value=default_source, label="Model", show_label=False, elem_id="model-source",
                          placeholder="bundled · HF id · model folder · file.gguf",
                          info="bundled (SmolLM2-135M), a Hugging Face id, a local folder or a .gguf file")
    with gr.Row():
        c.calib = gr.Dropdown(CALIB_CHOICES, value=default_calib, label="Calibration data", scale=3,
                              elem_id="calib-name")
    c.calib_file = gr.Textbox(label="Calibration file", placeholder="/path/to/text.txt or .jsonl(.gz)",
                              visible=default_calib == "file", elem_id="calib-file")
    with gr.Row():
        n_default, len_default = default_calibration_size(default_calib)
        c.n_samples = gr.Number(value=n_default, label="Samples", precision=0, minimum=1, maximum=1024, min_width=70,
                                elem_id="n-samples")
        c.seq_len = gr.Number(value=len_default, label="Tokens", precision=0, minimum=8, maximum=8192, min_width=70,
                              elem_id="seq-len")
        c.seed = gr.Number(value=0, label="Seed", precision=0, min_width=60)
    c.load = gr.Button("Load", size="sm", elem_id="btn-load")
    c.card = gr.HTML(common.model_card(Session()), elem_id="model-card")

    gr.HTML("<div class='cx-h3'>Plan</div>")
    c.method = gr.Dropdown(method_choices(), value=DEFAULT_METHOD, label="Method (used by Prune)",
                           elem_id="method")
    c.method_note = gr.HTML(method_note(DEFAULT_METHOD), elem_id="method-note")
    c.ratio = RatioSlider(minimum=0.0, maximum=RATIO_MAX, value=0.2, step=0.01, label="Target ratio",
                        info="the share of the model's parameters (its learned numbers) to remove", elem_id="ratio")
    c.ratio_of = gr.Radio([("of all parameters", "all"), ("of the transformer blocks", "blocks")], value="all",
                          show_label=False, elem_id="ratio-of", container=False)
    c.ratio_note = gr.HTML("", elem_id="ratio-note")
    c.ratio_warning = gr.HTML("", elem_id="ratio-warning")
    c.ratio_typed = gr.Number(visible=False, elem_id="ratio-typed")  # what was typed, before the slider's range
    c.sparsity = gr.Dropdown(SPARSITY_CHOICES, value=DEFAULT_SPARSITY, allow_custom_value=True, label="Sparsity",
                             info="zeros inside every linear: a share (0.5, 60%) or N:M (2:4 = 2 zeros in every "
                                  "4 weights); nothing is removed", visible=uses(DEFAULT_METHOD, "sparsity"),
                             elem_id="sparsity")
    c.allocation = gr.Radio(ALLOCATION_CHOICES, value=DEFAULT_ALLOCATION, label="Layer shares",
                            elem_id="allocation",
                            info="how much of the target each layer gives up: the method's own rule, or searched "
                                 "so the pruned model answers most like the original (a few minutes more)")
    c.generations = gr.Number(value=DEFAULT_GENERATIONS, precision=0, minimum=1, maximum=MAX_GENERATIONS,
                              label="search generations", visible=False, elem_id="search-generations",
                              info="rounds of trying new shares: more can get closer to the original, and take "
                                   "longer")
    c.allocation_note = gr.HTML(search_controls(DEFAULT_METHOD, DEFAULT_SPARSITY)[2], elem_id="allocation-note")
    with gr.Column(visible=True, elem_id="comp-controls") as c.comp_controls:
        with gr.Row(equal_height=True):
            c.n_remove = gr.Slider(0, MAX_REMOVE, value=DEFAULT_REMOVE, step=1, label="Layers to remove", scale=3,
                                   elem_id="n-remove")
            c.auto = gr.Checkbox(label="auto", value=False, scale=1, min_width=60,
                                 info="sweep, keep the best")
        c.protected = gr.Dropdown([], value=[], multiselect=True, label="Protected layers", allow_custom_value=True,
                                  info="layers never removed or pruned (default: first two and last); pick or type "
                                       "layer numbers", elem_id="protected")
        c.protected_note = gr.HTML("", elem_id="protected-note")
        c.score = gr.Dropdown([(SCORE_LABELS.get(k, k), k) for k in SCORES], value=DEFAULT_SCORE,
                              label="Neuron importance score")
        c.mask = gr.Checkbox(label="Mask tuning (least-squares compensation)", value=True)
        with gr.Accordion("Advanced", open=False):
            c.inputs = gr.Radio([("identical (paper)", "identical"), ("accumulated", "accumulated"),
                                 ("paired (paper's accumulated form)", "paired")],
                                value="identical", label="Calibration inputs of each layer",
                                info="paired: inputs from the pruned model, target from the unpruned one")
            c.kinds = gr.CheckboxGroup([], value=[], label="Denses that may lose neurons")
            c.depth = gr.Slider(0, MAX_REMOVE, value=DEFAULT_DEPTH, step=1,
                                label="Measure layer removal ahead (layers)",
                                info="0 = only what the plan removes; the layer slider then offers to measure more "
                                     "when moved. Each layer ahead makes Analyse slower.")
    c.data = [c.source, c.calib, c.calib_file, c.n_samples, c.seq_len, c.seed]
    c.settings = [c.ratio, c.n_remove, c.auto, c.protected, c.score, c.mask, c.inputs, c.kinds, c.depth]
    return c


def build_actions(c: SimpleNamespace) -> None:
    """Analyse / Prune / Cancel, above the tabs and kept in view while the page scrolls: in the sidebar a
    sticky bar covered its last controls (the layers to remove, the protected-layer chips)."""
    with gr.Row(elem_classes=["cx-actions"], elem_id="actions", equal_height=True):
        c.analyse = gr.Button("Analyse", variant="primary", elem_id="btn-analyse", min_width=80, scale=1)
        c.prune = gr.Button("Prune", variant="primary", elem_id="btn-prune", min_width=80, scale=1)
        c.cancel = gr.Button("Cancel", variant="stop", elem_id="btn-cancel", min_width=70, scale=1)
        c.cancel_note = gr.HTML("", elem_id="cancel-note", scale=3)


def wire(c: SimpleNamespace, session: gr.State, heavy: dict) -> None:
    c.calib.change(lambda v: gr.update(visible=v == "file"), c.calib, c.calib_file, queue=False)
    c.load.click(load, [session, *c.data], [c.card, c.protected, c.kinds, c.n_remove], **heavy)
    # typing another model path drops the last load's error from the card (it spoke of the old path)
    c.source.change(common.model_card, session, c.card, queue=False)
    c.method.change(select_method, c.method, [c.method_note, c.comp_controls, c.ratio, c.sparsity], queue=False).then(
        lambda method: gr.update(visible=uses(method or DEFAULT_METHOD, "ratio")), c.method, c.ratio_of, queue=False)
    # Layer shares: shown where the method (at its pattern) has shares to search; generations while searching
    gr.on([c.method.change, c.sparsity.change, c.allocation.change], search_controls,
          [c.method, c.sparsity, c.allocation], [c.allocation, c.generations, c.allocation_note], queue=False,
          show_progress="hidden")
    # a typed ratio out of range: box and slider back in step, and why (the js passes the raw value along)
    c.ratio.input(ratio_typed, [c.ratio, c.ratio_typed], [c.ratio, c.ratio_warning], js="(r, _) => [r, r]",
                  queue=False, show_progress="hidden")
    # what the ratio means for the loaded model, in both shares (also once a model is loaded: the card changes)
    gr.on([c.ratio.change, c.ratio_of.change, c.card.change], ratio_note, [session, c.ratio, c.ratio_of],
          c.ratio_note, queue=False, show_progress="hidden")
