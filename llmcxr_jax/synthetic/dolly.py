"""Plain-text instruction rows in the databricks-dolly-15k format (instruction, context, response,
category), generated from templates, so the text task of the synthetic corpus has data.
"""
from __future__ import annotations

import numpy as np

TERMS = {
    "atelectasis": ("Atelectasis is the partial or complete collapse of a lung or of part of it, so that the affected "
                    "region holds little or no air."),
    "a pleural effusion": ("A pleural effusion is a build-up of fluid in the pleural space, the thin gap between the "
                           "lung and the chest wall."),
    "a pneumothorax": ("A pneumothorax is air in the pleural space, which lets the lung pull away from the chest wall "
                       "and partly collapse."),
    "cardiomegaly": ("Cardiomegaly means an enlarged heart; on a frontal chest radiograph it is suggested when the "
                     "heart is wider than half of the chest."),
    "consolidation": ("Consolidation is lung tissue whose air spaces are filled with fluid, pus, blood or cells, so "
                      "that it looks solid and white on a radiograph."),
    "pulmonary edema": ("Pulmonary edema is excess fluid in the lungs, often caused by heart failure, and is seen as "
                        "haziness spreading out from the hila."),
    "the costophrenic angle": ("The costophrenic angle is the sharp corner where the diaphragm meets the chest wall "
                               "at the bottom of each lung."),
    "the hilum": ("The hilum is the region in the middle of each lung where the bronchi, arteries, veins and lymph "
                  "nodes enter and leave it."),
    "the mediastinum": ("The mediastinum is the central compartment of the chest between the lungs, holding the "
                        "heart, great vessels, trachea and oesophagus."),
    "a radiograph": ("A radiograph is an image made by passing X-rays through the body onto a detector; dense tissue "
                     "such as bone appears white."),
    "a posteroanterior view": ("A posteroanterior (PA) view is a chest radiograph taken with the X-rays passing from "
                               "the back to the front of a standing patient."),
    "an anteroposterior view": ("An anteroposterior (AP) view is taken with the X-rays passing from front to back, "
                                "often with a portable machine at the bedside."),
    "a lateral view": ("A lateral view is a chest radiograph taken from the side, which shows structures hidden "
                       "behind the heart or the diaphragm."),
    "an endotracheal tube": ("An endotracheal tube is a flexible tube placed through the mouth into the trachea to "
                             "keep the airway open during ventilation."),
    "a nasogastric tube": ("A nasogastric tube is passed through the nose and the oesophagus into the stomach to give "
                           "feeds or to drain its contents."),
    "a central venous catheter": ("A central venous catheter is a line placed in a large vein, with its tip usually "
                                  "in the superior vena cava."),
    "a pacemaker": ("A pacemaker is a small battery-powered device under the skin of the chest whose leads deliver "
                    "electrical pulses to the heart."),
    "a lung nodule": ("A lung nodule is a small round opacity in the lung, less than 3 cm across; larger ones are "
                      "called masses."),
    "a rib fracture": ("A rib fracture is a break in one of the ribs, usually after trauma, seen as a gap or a step "
                       "in the outline of the bone."),
    "the diaphragm": ("The diaphragm is the dome-shaped muscle that separates the chest from the abdomen; it is the "
                      "main muscle of breathing."),
    "the trachea": ("The trachea, or windpipe, is the airway that runs from the larynx down to the carina, where it "
                    "divides into the two main bronchi."),
    "an opacity": ("On a chest radiograph, an opacity is any area that looks whiter than it should because it blocks "
                   "more X-rays than normal lung does."),
    "a lucency": ("A lucency is an area that looks darker than its surroundings on a radiograph because it holds more "
                  "air or less dense tissue."),
}
BONES = ["rib", "clavicle", "sternum", "scapula", "vertebra", "humerus"]
ORGANS = ["heart", "lung", "liver", "stomach", "spleen", "oesophagus"]
STRUCTURES = ["heart", "lungs", "ribs", "clavicles", "diaphragm", "trachea", "spine", "mediastinum", "hila",
              "stomach bubble"]
SENTENCES = ["the heart size is within normal limits", "both lungs are clear",
             "there is no free air under the diaphragm",
             "the patient was asked to take a deep breath", "the film was taken with the patient standing",
             "the radiologist compared the study with the prior one", "the tube ends above the carina"]
COMPLAINTS = ["chest pain", "a cough", "shortness of breath", "fever", "a fall at home", "palpitations"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _row(kind: int, rng) -> dict:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    term = pick(list(TERMS))
    if kind == 0:
        q = pick(["What is {t}?", "Define {t}.", "Explain in one sentence what {t} is.",
                  "What does the term {t} mean?"])
        bare = term.split(" ", 1)[1] if term.split(" ", 1)[0] in ("a", "an", "the") else term
        q = q.format(t=bare if q.startswith(("Define", "What does the term")) else term)
        return {"instruction": q, "context": "", "response": TERMS[term], "category": "open_qa"}
    if kind == 1:
        a, b = (int(x) for x in rng.integers(2, 500, 2))
        op, word, val = pick([("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)])
        q = pick(["What is {a} {w} {b}?", "Compute {a} {o} {b}.", "Calculate {a} {w} {b} and give the result."])
        return {"instruction": q.format(a=a, b=b, w=word, o=op), "context": "", "response": f"{a} {word} {b} is {val}.",
                "category": "general_qa"}
    if kind == 2:
        other = pick([t for t in TERMS if t != term])
        context = " ".join(sorted([TERMS[term], TERMS[other]], key=lambda _: rng.random()))
        return {"instruction": f"Using the passage, explain what {term} is.", "context": context,
                "response": TERMS[term], "category": "closed_qa"}
    if kind == 3:
        s = pick(SENTENCES)
        how = pick(["in capital letters", "with its words in reverse order", "as a question"])
        done = {"in capital letters": s.upper() + ".", "as a question": "Is it true that " + s + "?",
                "with its words in reverse order": " ".join(s.split()[::-1]) + "."}[how]
        return {"instruction": f"Rewrite the following sentence {how}.", "context": s[0].upper() + s[1:] + ".",
                "response": done, "category": "creative_writing"}
    if kind == 4:
        k = int(rng.integers(3, 6))
        items = [STRUCTURES[i] for i in rng.choice(len(STRUCTURES), k, replace=False)]
        return {"instruction": f"List {k} structures that can be seen on a chest X-ray.", "context": "",
                "response": "\n".join(f"- {x.capitalize()}" for x in items), "category": "brainstorming"}
    if kind == 5:
        items = [*rng.choice(BONES, 2, replace=False), *rng.choice(ORGANS, 2, replace=False)]
        items = [str(x) for x in rng.permutation(items)]
        answer = " ".join(f"{x.capitalize()}: {'bone' if x in BONES else 'organ'}." for x in items)
        return {"instruction": "Classify each of the following as a bone or an organ: " + ", ".join(items) + ".",
                "context": "", "response": answer,
                "category": "classification"}
    if kind == 6:
        age, complaint, day = int(rng.integers(18, 95)), pick(COMPLAINTS), pick(DAYS)
        context = f"The patient is a {age}-year-old who came to the emergency department on {day} with {complaint}."
        field, answer = pick([("age", str(age)), ("main complaint", complaint), ("day of the visit", day)])
        return {"instruction": f"From the text, extract the patient's {field}.", "context": context,
                "response": answer[0].upper() + answer[1:] + ".", "category": "information_extraction"}
    if kind == 7:
        nums = [int(x) for x in rng.integers(0, 1000, int(rng.integers(4, 8)))]
        return {"instruction": "Sort these numbers from smallest to largest: " + ", ".join(map(str, nums)) + ".",
                "context": "", "response": ", ".join(map(str, sorted(nums))) + ".", "category": "general_qa"}
    s1, s2 = TERMS[term], pick(SENTENCES)
    return {"instruction": "Summarize the following text in one sentence.",
            "context": f"{s1} In a typical report, {s2}.", "response": s1, "category": "summarization"}


def dolly_rows(n: int, seed: int) -> list[dict]:
    """n rows cycling through 9 template kinds (definitions, arithmetic, reading, rewriting, lists,
    classification, extraction, sorting, summaries); row i depends only on (seed, i)."""
    return [_row(i % 9, np.random.default_rng([seed, 8, i])) for i in range(n)]
