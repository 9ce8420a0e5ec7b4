"""The miniature's benchmarks, generated procedurally: a text task the base LLM learns first, and image questions.

Text task (the base LLM's "language ability", standing in for the paper's NLP benchmarks):
  - ``facts``: closed-book recall of made-up facts ("where does zubo live?" -> "lund"), like MMLU's knowledge;
  - ``arithmetic``: single-digit sums ("what is 3 plus 4?" -> "7"), like GSM8K's skill;
  - ``reading``: the multimodal questions about a scene *described in words* ("scene: red circle, red northwest.
    where is the red shape?" -> "the red shape is northwest"), like DROP's reading comprehension, tested on unseen
    scenes.
Facts and sums are learnt by heart; reading is a skill. Reading also gives the base the words and the reasoning the
image questions need, as a real LLM has them before it meets images: multimodal training then has to connect
image tokens to an ability the LLM has, not teach a new language.

Multimodal task (standing in for the paper's MLLM benchmarks): 32x32 scenes of one to three coloured shapes, one
per quadrant, drawn with Pillow, with questions about colour, shape, count and position, and one kind that needs the
language model's arithmetic too ("how many shapes plus 4?").

Every sample is a conversation in the transformers chat format, so the package's own processor and collator
prepare it. Everything is a pure function of its seed.
"""

import random

from PIL import Image, ImageDraw


COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 215), "yellow": (225, 190, 30)}
SHAPES = ("square", "circle", "triangle")
# compass corners (north is up): one word, so one token, for each quadrant; a two-token answer ("top left") needs
# the second word bound to the object again, which a model this small gets wrong (it says "top left" for "top right")
QUADRANTS = ("northwest", "northeast", "southwest", "southeast")
IMAGE_SIZE = 32

_NAMES = [a + b for a in ("zu", "mi", "ka", "lo", "be", "ti", "ro", "sa") for b in ("bo", "pa", "ni", "dex", "ru")]
_CITIES = ("lund", "oslo", "riga", "bern", "kiev", "lima", "baku", "doha")


# -- text task -----------------------------------------------------------------------------------------------------
def _conversation(question, answer, image=None):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image"})
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [] if image is None else [image],
        "answer": answer,
    }


def facts():
    """The 40 made-up facts, fixed (the same world for every seed): ``{name: city}``."""
    rng = random.Random(1234)
    return {name: rng.choice(_CITIES) for name in _NAMES}


def _fact_sample(name, city):
    return _conversation(f"where does {name} live?", city)


def _sum_sample(a, b):
    return _conversation(f"what is {a} plus {b}?", str(a + b))


def describe_scene(scene):
    """The scene in words, objects in a random but fixed order: "scene: red circle, red northwest, ...".

    Each object is two pairs, its colour then its shape, and its colour then its position: every question is then
    answered by one word that stands next to the colour (or, for colour questions, next to the shape), the one
    lookup the small base learns. Described as "red circle northwest" or "northwest red circle", the link between
    colour and position was never learnt: the base named the position of any object of the scene
    (docs/paper_in_miniature.md)."""
    return "scene: " + ", ".join(f"{colour} {shape}, {colour} {quadrant}" for colour, shape, quadrant in scene) + "."


def reading_sample(scene, qa):
    """The text form of an image question: the scene described in words, then the question (as the image comes
    before the question in the image samples)."""
    return _conversation(f"{describe_scene(scene)} {qa[0]}", qa[1])


def _reading_sample(rng):
    while True:
        scene = random_scene(rng)
        qa = scene_question(scene, rng.choice(QUESTION_KINDS), rng)
        if qa is not None:
            return reading_sample(scene, qa)


def reading_by_kind(per_kind, seed):
    """``per_kind`` reading questions of every kind, on new scenes, each sample tagged with its ``"kind"``."""
    rng = random.Random(seed)
    return [
        {**reading_sample(*_question_on_new_scene(rng, kind)), "kind": kind}
        for kind in QUESTION_KINDS for _ in range(per_kind)
    ]


def text_train_samples(count, seed, reading_share):
    """``count`` training conversations of the text task: reading with ``reading_share``, facts and sums evenly."""
    rng = random.Random(seed)
    world = sorted(facts().items())
    samples = []
    for _ in range(count):
        kind = 2 if rng.random() < reading_share else rng.randrange(2)
        if kind == 0:
            samples.append(_fact_sample(*rng.choice(world)))
        elif kind == 1:
            samples.append(_sum_sample(rng.randrange(10), rng.randrange(10)))
        else:
            samples.append(_reading_sample(rng))
    return samples


def text_eval_samples(reading_count=200, seed=20_000):
    """The text benchmark: every fact (40) and sum (100), and ``reading_count`` reading questions on new scenes."""
    rng = random.Random(seed)
    return {
        "facts": [_fact_sample(name, city) for name, city in sorted(facts().items())],
        "arithmetic": [_sum_sample(a, b) for a in range(10) for b in range(10)],
        "reading": [_reading_sample(rng) for _ in range(reading_count)],
    }


# -- multimodal task -----------------------------------------------------------------------------------------------
def random_scene(rng):
    """One to three objects ``(colour, shape, quadrant)`` with distinct colours and quadrants."""
    count = rng.randint(1, 3)
    colours = rng.sample(sorted(COLOURS), count)
    quadrants = rng.sample(QUADRANTS, count)
    return [(colour, rng.choice(SHAPES), quadrant) for colour, quadrant in zip(colours, quadrants)]


def render_scene(scene, seed=0, size=IMAGE_SIZE):
    """A white ``size`` x ``size`` image with each object drawn in its quadrant, jittered."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    half = size // 2
    for colour, shape, quadrant in scene:
        side = rng.randint(half * 5 // 8, half - 2)
        x0 = (half if quadrant.endswith("east") else 0) + rng.randint(1, half - side - 1)
        y0 = (half if quadrant.startswith("south") else 0) + rng.randint(1, half - side - 1)
        box = (x0, y0, x0 + side, y0 + side)
        fill = COLOURS[colour]
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


QUESTION_KINDS = ("colour", "shape", "count", "position", "count_plus")


def scene_question(scene, kind, rng):
    """``(question, answer)`` of one kind about ``scene``; ``None`` if the scene cannot answer it unambiguously.

    Colour, shape and position answers name their object first, as chat models do ("where is the red shape?" ->
    "the red shape is northwest"): in the scene, the answer word stands next to a word the answer has just named,
    one lookup, the copying a pretrained LLM already does. The bare answer ("northwest") needs that lookup in one
    jump from the question, which a base this small did not learn (docs/paper_in_miniature.md: it answered at the
    level of naming any object of the scene)."""
    if kind == "colour":
        shapes = [shape for _, shape, _ in scene]
        unique = [shape for shape in shapes if shapes.count(shape) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"what colour is the {shape}?", f"the {shape} is {next(c for c, s, _ in scene if s == shape)}"
    colour, shape, quadrant = rng.choice(scene)
    if kind == "shape":
        return f"what shape is the {colour} one?", f"the {colour} one is a {shape}"
    if kind == "position":
        return f"where is the {colour} shape?", f"the {colour} shape is {quadrant}"
    if kind == "count":
        return "how many shapes are there?", str(len(scene))
    if kind == "count_plus":
        extra = rng.randint(1, 6)
        return f"how many shapes plus {extra}?", str(len(scene) + extra)
    raise ValueError(f"unknown question kind {kind!r}")


def _question_on_new_scene(rng, kind):
    """``(scene, (question, answer))``: new scenes are drawn until one answers a ``kind`` question unambiguously."""
    while True:
        scene = random_scene(rng)
        qa = scene_question(scene, kind, rng)
        if qa is not None:
            return scene, qa


def multimodal_samples(count, seed):
    """``count`` image conversations, question kinds in turn; the image is rendered from the scene."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
        scene, qa = _question_on_new_scene(rng, kind)
        sample = _conversation(*qa, image=render_scene(scene, seed=rng.randrange(2**31)))
        sample["kind"] = kind
        samples.append(sample)
    return samples


def corpus():
    """Text the miniature's tokenizer is trained on: every word any sample can use."""
    lines = [f"where does {name} live? {city}" for name, city in facts().items()]
    lines += [f"what is {a} plus {b}? {a + b}" for a in range(10) for b in range(10)]
    lines += [f"what colour is the {shape}? what shape is the {colour} one? where is the {colour} shape?"
              for shape in SHAPES for colour in COLOURS]
    lines += [f"how many shapes are there? {n} how many shapes plus {n}? {q}" for n in range(10) for q in QUADRANTS]
    lines += [describe_scene(random_scene(random.Random(seed))) for seed in range(50)]
    # every answer also at the start of a line, as it stands after the chat template's "assistant\n": one token
    lines += [*COLOURS, *SHAPES, *QUADRANTS, *_CITIES, *map(str, range(20))]
    return lines * 4
