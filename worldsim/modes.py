"""Modes, prompt templates (SPEC §2) and how a session's turns are laid out in one id sequence.

A session is one interleaved sequence. Its first turn opens it with the task prompt:

    <BOS>You are a helpful assistant for {task} task. USER: {question}{images} ASSISTANT: <extra_100>{answer}

- `instruction` turns (explore steps, follow-up questions) close the open answer and ask again:
      <extra_101> USER: {instruction}{images} ASSISTANT: <extra_100>{answer}
- `continue` turns (free exploration, the next story beat) add to the open answer, with no user text:
      {answer, continued}
- an answer is text segments and images (SPEC §2 serialization), optionally chain-of-thought segments
  written <extra_60> ... <extra_61>.

Per mode:
- explore: prompt = a scene description and/or an image; every instruction or continue turn yields
  one step: a short narration, then one image (the FSM enforces it).
- story: prompt (+ optional image) -> one beat (text then image); `continue` adds beats.
- howto: question -> numbered steps, each text then an image, until the model closes the answer
  (at most `max_steps` images); the system sentence gets SPEC's howto suffix.
- vla: question = "Robot Arm Type: {arm}. Instruction: {goal}. Finish the task with {n} steps." plus
  an optional scene image -> exactly n subtasks, each "Current Step: {subtask}" text then a keyframe.
  A replan (edit subtask k, plan again from there) forces the answer's start: subtasks 1..k-1 as
  their exact ids, then "Current Step: {edited}"; the model goes on from the keyframe of k
  (`replan_shape`).
- t2i: each turn is independent (no history): prompt -> one image.
- x2i: each turn is independent: 1-3 reference images, placed before the question -> one image.

Guidance's unconditional sequence has the same layout with the generic system sentence ("You are a
helpful assistant.") and every user text removed, images kept (SPEC §2's unconditional prompt,
extended turn by turn), so guidance follows each instruction, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MODES = ("explore", "story", "howto", "vla", "t2i", "x2i")
TURN_KINDS = ("prompt", "instruction", "continue")
HOWTO_SUFFIX = " Please generate a response with interleaved text and images."
MAX_TEXT_CHARS = 4000  # a user text longer than this is refused before it is queued
MAX_REFERENCE_IMAGES = 3
MAX_VLA_STEPS = 12


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; allowed: {list(MODES)}")
    return mode


def check_text(text, field: str, required: bool = True) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"{field}: must be a string")
    if required and not text.strip():
        raise ValueError(f"{field}: must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{field}: {len(text):,} characters is over the limit of {MAX_TEXT_CHARS:,}")
    return text.strip()


def vla_question(arm: str, goal: str, steps) -> str:
    """The paper's embodied-manipulation prompt (the release has none)."""
    arm, goal = check_text(arm, "arm"), check_text(goal, "goal")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_VLA_STEPS:
        raise ValueError(f"steps: must be an integer in [1, {MAX_VLA_STEPS}], got {steps!r}")
    return f"Robot Arm Type: {arm}. Instruction: {goal}. Finish the task with {steps} steps."


def vla_step_text(subtask: str) -> str:
    """One subtask's text in a plan's answer, as the training data writes it (train/sim/panda.py)."""
    return f"Current Step: {subtask}"


@dataclass(frozen=True)
class TurnShape:
    """What one turn's answer must look like (enforced by the decoding FSM)."""

    min_images: int
    max_images: int
    max_text_tokens: int  # per text run
    start_with_image: bool = False
    min_text_tokens: int = 1  # text (narration, subtask, step) comes before each image


def turn_shape(mode: str, kind: str, settings: dict) -> TurnShape:
    if mode in ("t2i", "x2i"):
        return TurnShape(1, 1, 1, start_with_image=True, min_text_tokens=0)
    if mode == "vla" and kind == "prompt":
        n = settings["steps"]
        return TurnShape(n, n, 48)
    if mode == "howto" and kind == "prompt":
        return TurnShape(1, int(settings.get("max_steps", 4)), 96)
    if mode == "story":
        return TurnShape(1, 1, 128)
    return TurnShape(1, 1, 64)  # explore steps, follow-ups, continues


def replan_shape(settings: dict, step: int) -> TurnShape:
    """The rest of a vla plan whose answer is forced up to subtask `step`'s text (subtasks 1..step-1
    with their keyframes, then "Current Step: {edited}"; the forced ids end the prompt).

    This is the plan turn's FSM resumed exactly where the forced ids leave it: step-1 keyframes are
    done, so the images still owed and allowed are n-step+1; the edited text is the whole subtask, so
    its text run is closed and the keyframe opens at once (BOI first, which `start_with_image` forces);
    every later subtask is text then keyframe under the plan's own text limits."""
    left = settings["steps"] - step + 1
    assert 1 <= left <= settings["steps"], (step, settings["steps"])
    return replace(turn_shape("vla", "prompt", settings), min_images=left, max_images=left, start_with_image=True)


def system_text(mode: str, conditional: bool) -> str:
    if not conditional:
        return "You are a helpful assistant."
    return f"You are a helpful assistant for {mode} task." + (HOWTO_SUFFIX if mode == "howto" else "")


class Layout:
    """Builds the id sequence of a session. `image_ids(hash) -> ids` serializes a stored image.

    Adjacent text is joined before it is tokenized, so "task. USER: a red cube" splits exactly as
    the release's tokenizer splits the whole prompt string."""

    def __init__(self, tokenizer, image_ids):
        self.tok, self.vocab, self.image_ids = tokenizer, tokenizer.vocab, image_ids

    def encode(self, parts: list) -> list[int]:
        """parts: strings and id lists -> ids, each run of strings tokenized as one string."""
        ids, text = [], []
        for part in parts + [[]]:
            if isinstance(part, str):
                text.append(part)
                continue
            if text:
                ids += self.tok.encode("".join(text), allow_special=False)
                text = []
            ids += part
        return ids

    def answer(self, segments: list[dict]) -> list:
        parts = []
        for seg in segments:
            if seg["type"] == "text":
                parts.append(seg["text"])
            elif seg["type"] == "image":
                parts.append(self.image_ids(seg["image"]))
            elif seg["type"] == "cot":
                parts += [[self.vocab.cot_start], seg["text"], [self.vocab.cot_end]]
        return parts

    def user(self, turn_input: dict, mode: str, conditional: bool) -> list:
        """USER: {question}{images} ASSISTANT: <extra_100> (x2i: images first)."""
        question = [turn_input.get("text", "")] if conditional else []
        images = [self.image_ids(h) for h in turn_input.get("images", [])]
        body = images + question if mode == "x2i" else question + images
        return [" USER: ", *body, " ASSISTANT: ", [self.vocab.answer_start]]

    def turn_pieces(self, mode: str, turns: list[dict], conditional: bool) -> list[list[int]]:
        """One id list per turn: turn 0 carries the opening; concatenated they are the sequence,
        ending inside the last answer."""
        v = self.vocab
        pieces = []
        for i, t in enumerate(turns):
            parts = []
            if i == 0:
                parts += [[v.bos], system_text(mode, conditional)]
            if t["kind"] != "continue":
                if i > 0:
                    parts.append([v.answer_end])
                parts += self.user(t["input"], mode, conditional)
            answer_ids = t.get("meta", {}).get("answer_ids")  # the ids the model produced, exactly
            parts += [answer_ids] if answer_ids is not None else self.answer(t["output"])
            pieces.append(self.encode(parts))
        return pieces
