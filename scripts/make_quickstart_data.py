"""Writes the quickstart task's data: turn a one-line calendar request into a fixed JSON record.

The base SmolLM2-135M-Instruct answers such requests in prose; after a short LoRA run it answers
with exactly {"title", "day", "time", "place"}. Deterministic (seeded): rerunning rewrites the
same files. Usage: python scripts/make_quickstart_data.py [--out recipes/data]
"""

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "recipes" / "data"
PEOPLE = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Lucas", "Sofia", "Ben", "Chloe", "Ivan",
          "Nora", "Diego", "Hana", "Sam", "Eva", "Raj", "Mila", "Jonas"]
EVENTS = ["Lunch with {p}", "Coffee with {p}", "Call {p}", "Dinner with {p}", "Meeting with {p}",
          "Review the budget with {p}", "Dentist appointment", "Team standup", "Yoga class", "Piano lesson",
          "Interview with {p}", "Drinks with {p}", "Project kickoff", "Haircut", "Parent-teacher meeting"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["Luigi's", "the office", "Room 4B", "the park", "Cafe Central", "home", "the library", "Studio 9",
          "the gym", "Blue Door Bistro", "the clinic", "Zoom", "the school", "Harbor Hall"]
TEMPLATES = [
    "{event} on {day} at {time} at {place}",
    "Schedule {event_l} for {day} at {time}, at {place}",
    "Add {event_l} on {day}, {time}, {place}",
    "Put {event_l} in my calendar: {day} {time} at {place}",
    "{day} at {time}: {event_l} at {place}",
    "Remind me: {event_l}, {day} {time}, location {place}",
]
INSTRUCTION = "Convert this calendar request to JSON:\n"


def spoken_time(rng):
    hour = rng.randint(7, 21)
    minute = rng.choice([0, 0, 15, 30, 45])
    h12 = hour % 12 or 12
    suffix = "am" if hour < 12 else "pm"
    spoken = f"{h12}{suffix}" if minute == 0 else f"{h12}:{minute:02d}{suffix}"
    return spoken, f"{hour:02d}:{minute:02d}"


def make_row(rng):
    person = rng.choice(PEOPLE)
    event = rng.choice(EVENTS).format(p=person)
    day, place = rng.choice(DAYS), rng.choice(PLACES)
    spoken, clock = spoken_time(rng)
    template = rng.choice(TEMPLATES)
    request = template.format(event=event, event_l=event[0].lower() + event[1:], day=day, time=spoken, place=place)
    answer = json.dumps({"title": event, "day": day, "time": clock, "place": place})
    return {"prompt": INSTRUCTION + request, "completion": answer}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for quickstart_train.jsonl and quickstart_eval.jsonl")
    out = parser.parse_args(argv).out
    rng = random.Random(20261125)
    rows, seen = [], set()
    while len(rows) < 200:
        row = make_row(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("quickstart_train.jsonl", rows[:160]), ("quickstart_eval.jsonl", rows[160:])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"wrote {len(part)} rows to {out / name}")


if __name__ == "__main__":
    main()
