"""The miniature's benchmarks, generated procedurally: a text task the base LLM learns first, and image questions.

Text task (the base LLM's "language ability", standing in for the paper's NLP benchmarks):
  - ``facts``: closed-book recall of made-up facts ("where does zubo live?" -> "lund"), like MMLU's knowledge;
  - ``arithmetic``: single-digit sums ("what is 3 plus 4?" -> "7"), like GSM8K's skill;
  - ``reading``: the multimodal questions about a scene *described in words* ("scene: a red circle at top left.
    where is the red shape?" -> "top left"), like DROP's reading comprehension, tested on unseen scenes.
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
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
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
    """The scene in words, objects in a random but fixed order: "scene: a red circle at top left, ..."."""
    return "scene: " + ", ".join(f"a {colour} {shape} at {quadrant}" for colour, shape, quadrant in scene) + "."


def _reading_sample(rng):
    while True:
        scene = random_scene(rng)
        qa = scene_question(scene, rng.choice(QUESTION_KINDS), rng)
        if qa is not None:
            return _conversation(f"{describe_scene(scene)} {qa[0]}", qa[1])


def text_train_samples(count, seed):
    """``count`` training conversations of the text task, the three kinds drawn at random."""
    rng = random.Random(seed)
    world = sorted(facts().items())
    samples = []
    for _ in range(count):
        kind = rng.randrange(3)
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
        x0 = (half if quadrant.endswith("right") else 0) + rng.randint(1, half - side - 1)
        y0 = (half if quadrant.startswith("bottom") else 0) + rng.randint(1, half - side - 1)
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
    """``(question, answer)`` of one kind about ``scene``; ``None`` if the scene cannot answer it unambiguously."""
    if kind == "colour":
        shapes = [shape for _, shape, _ in scene]
        unique = [shape for shape in shapes if shapes.count(shape) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"what colour is the {shape}?", next(c for c, s, _ in scene if s == shape)
    colour, shape, quadrant = rng.choice(scene)
    if kind == "shape":
        return f"what shape is the {colour} one?", shape
    if kind == "position":
        return f"where is the {colour} shape?", quadrant
    if kind == "count":
        return "how many shapes are there?", str(len(scene))
    if kind == "count_plus":
        extra = rng.randint(1, 6)
        return f"how many shapes plus {extra}?", str(len(scene) + extra)
    raise ValueError(f"unknown question kind {kind!r}")


def multimodal_samples(count, seed):
    """``count`` image conversations, question kinds in turn; the image is rendered from the scene."""
    rng = random.Random(seed)
    samples = []
    while len(samples) < count:
        kind = QUESTION_KINDS[len(samples) % len(QUESTION_KINDS)]
        scene = random_scene(rng)
        qa = scene_question(scene, kind, rng)
        if qa is None:
            continue
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
    return lines * 4
