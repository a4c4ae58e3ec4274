#!/usr/bin/env python3
"""Writes the demo's prompt data: python/fastrlhf/data/builtin/instructions.jsonl.

Short everyday instructions (one per line, ``{"prompt": ...}``) built from templates and topics
with a fixed seed, so the file is reproducible: run this script again after changing the lists.
The demo's policy answers them; the simulated annotator prefers friendly, concise answers.
"""

import json
import pathlib
import random

TEMPLATES = [
    "Give me a tip for {topic}.",
    "How can I get better at {topic}?",
    "What is a good way to start {topic}?",
    "Say something encouraging about {topic}.",
    "Suggest one idea for {topic}.",
    "I am nervous about {topic}. Any advice?",
    "Explain {topic} in one sentence.",
    "What should a beginner know about {topic}?",
]
TOPICS = [
    "sleeping better", "cooking dinner", "learning a language", "running", "saving money", "writing emails",
    "public speaking", "gardening", "reading more books", "drinking more water", "making friends",
    "studying for exams", "painting", "playing the guitar", "keeping a journal", "meditation", "baking bread",
    "job interviews", "cleaning the house", "learning to swim", "taking photos", "hiking", "time management",
    "staying focused", "riding a bike",
]


def main():
    rng = random.Random(20261204)
    prompts = [t.format(topic=topic) for t in TEMPLATES for topic in TOPICS]
    rng.shuffle(prompts)
    root = pathlib.Path(__file__).resolve().parents[1]
    out = root / "python" / "fastrlhf" / "data" / "builtin" / "instructions.jsonl"
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main()
