"""Generate the small built-in multi-task dataset (topic, sentiment, NER) used by ``python train.py``.

Run ``python multitask_st/default_data/make_default_data.py`` to rewrite the two ``default_*.jsonl`` files.
The output is deterministic (fixed seed). Templates are written pre-tokenised (punctuation separated by spaces);
``{PER}``, ``{ORG}`` and ``{LOC}`` slots are filled from the name lists below and tagged with BIO labels.
"""

import json
import random
from pathlib import Path

SEED = 13
HERE = Path(__file__).resolve().parent

PER = [
    "Maria Lopez",
    "James Carter",
    "Aiko Tanaka",
    "Daniel Okafor",
    "Sofia Rossi",
    "Liam Byrne",
    "Priya Nair",
    "Lucas Moreau",
    "Hannah Weiss",
    "Omar Haddad",
    "Elena Petrova",
    "Tom Fischer",
    "Grace Mensah",
    "Kenji Sato",
    "Laura Jensen",
    "Ben Alvarez",
    "Nadia Karim",
    "Chloe Martin",
    "Rafael Souza",
    "Emma Lindqvist",
    "Victor Hale",
    "Ines Duarte",
    "Samuel Reed",
    "Yuki Mori",
    "Anna Kowalska",
    "David Chen",
    "Fatima Bello",
    "Oscar Nilsson",
    "Clara Vogel",
    "Marcus Webb",
    "Leila Farah",
    "Peter Novak",
]
ORG = [
    "Northwind Labs",
    "Siemens",
    "Toyota",
    "Unilever",
    "Nestlé",
    "Greenfield Bank",
    "Apex Robotics",
    "Bluewave Media",
    "the World Health Organization",
    "the European Commission",
    "NASA",
    "Harbor Foods",
    "Orion Pharma",
    "Silverline Airways",
    "the United Nations",
    "Redstone Capital",
    "Pixel Forge Studios",
    "Brightside Records",
    "the Liberal Party",
    "Cedar Telecom",
    "Real Madrid",
    "Ajax",
    "the Boston Celtics",
    "Helix Biotech",
    "Summit Energy",
    "Crestview Motors",
]
LOC = [
    "Paris",
    "Berlin",
    "Tokyo",
    "Nairobi",
    "Toronto",
    "Sydney",
    "Madrid",
    "Lisbon",
    "Cairo",
    "Mumbai",
    "Chicago",
    "Oslo",
    "Brazil",
    "Canada",
    "Kenya",
    "Japan",
    "Germany",
    "Mexico City",
    "Seoul",
    "Dublin",
    "Vienna",
    "Lagos",
    "Buenos Aires",
    "Norway",
    "Scotland",
    "Vancouver",
    "Athens",
    "Singapore",
]

# (topic, sentiment) -> templates. "{ORG}" entries starting with "the" keep "the" outside the entity span.
T = {
    ("business", "positive"): [
        "Shares of {ORG} jumped after the company reported record profits in {LOC} .",
        "{ORG} beat analysts' expectations , and chief executive {PER} promised higher dividends .",
        "Investors cheered as {ORG} opened a new factory near {LOC} , creating hundreds of jobs .",
        "Sales at {ORG} grew strongly this quarter , according to finance chief {PER} .",
        "The merger between {ORG} and {ORG} was welcomed by shareholders as a smart deal .",
        "Small businesses in {LOC} are thriving thanks to cheaper loans , said economist {PER} .",
    ],
    ("business", "negative"): [
        "Shares of {ORG} plunged after the company warned of heavy losses in {LOC} .",
        "{ORG} will cut two thousand jobs , chief executive {PER} admitted on Monday .",
        "Customers complained that {ORG} raised prices again while service got worse .",
        "The collapse of {ORG} left suppliers in {LOC} with millions in unpaid bills .",
        "Analyst {PER} called the quarterly results of {ORG} a painful disappointment .",
        "Rising costs forced several factories in {LOC} to close , hurting local workers .",
    ],
    ("business", "neutral"): [
        "{ORG} will publish its annual report in {LOC} next Thursday .",
        "{PER} was appointed chief financial officer of {ORG} , effective in March .",
        "The central bank in {LOC} kept interest rates unchanged this month .",
        "{ORG} said it is reviewing its supply contracts with partners in {LOC} .",
        "Trading volumes on the {LOC} stock exchange were in line with last week .",
    ],
    ("science", "positive"): [
        "Researchers at {ORG} made a remarkable breakthrough in battery design , said lead author {PER} .",
        "A new vaccine developed in {LOC} proved highly effective in early trials .",
        "Astronomers led by {PER} discovered a beautiful spiral galaxy with a telescope in {LOC} .",
        "{ORG} successfully launched its new climate satellite , a triumph for the team .",
        "The study by {PER} offers exciting hope for patients with rare diseases .",
        "Scientists in {LOC} celebrated after the experiment finally confirmed their theory .",
    ],
    ("science", "negative"): [
        "A rocket built by {ORG} exploded shortly after launch , a costly failure for the programme .",
        "Researchers in {LOC} warned that coral reefs are dying at an alarming rate .",
        "{PER} said the drug trial at {ORG} was halted after serious side effects .",
        "A flawed dataset ruined years of work at the laboratory in {LOC} .",
        "Funding cuts at {ORG} are devastating young scientists , complained {PER} .",
        "The long-awaited study turned out to be disappointing and poorly designed , critics in {LOC} said .",
    ],
    ("science", "neutral"): [
        "{ORG} will hold a conference on genetics in {LOC} in June .",
        "{PER} published a paper on soil bacteria in a journal this week .",
        "The observatory near {LOC} recorded data from the comet for six nights .",
        "A team at {ORG} is measuring sea temperatures off the coast of {LOC} .",
        "The report by {PER} describes how the samples were collected and stored .",
    ],
    ("sports", "positive"): [
        "{PER} scored twice as {ORG} won a thrilling final in {LOC} .",
        "Fans in {LOC} celebrated a brilliant victory for the national team .",
        "{PER} broke the world record in the marathon , a stunning performance .",
        "{ORG} produced a superb display to reach the semi-finals , said coach {PER} .",
        "The young sprinter from {LOC} won gold in an inspiring race .",
        "{PER} returned from injury and played wonderfully in the win over {ORG} .",
    ],
    ("sports", "negative"): [
        "{ORG} suffered a humiliating defeat in {LOC} , and fans booed the players .",
        "{PER} was injured again and will miss the rest of the season .",
        "The referee's awful decisions ruined the match , complained coach {PER} .",
        "{ORG} were knocked out early after a dismal performance in {LOC} .",
        "Fans in {LOC} were furious after the club sold its best player , {PER} .",
        "A doping scandal has badly damaged the reputation of cycling in {LOC} .",
    ],
    ("sports", "neutral"): [
        "{ORG} will face {ORG} in {LOC} on Saturday afternoon .",
        "{PER} signed a two-year contract with {ORG} .",
        "The tournament in {LOC} starts next week with sixteen teams .",
        "Coach {PER} named the squad for the friendly match against {LOC} .",
        "The stadium in {LOC} can hold forty thousand spectators .",
    ],
    ("politics", "positive"): [
        "Voters in {LOC} praised the new health law , which passed with broad support .",
        "Minister {PER} secured a historic peace agreement in {LOC} , winning wide praise .",
        "The talks at {ORG} ended in a welcome deal to cut emissions .",
        "{PER} won the election in {LOC} by a comfortable margin , and supporters celebrated .",
        "Lawmakers from {PARTY} and the opposition worked together on a successful reform .",
        "The new mayor of {LOC} , {PER} , was applauded for cleaning up the city budget .",
    ],
    ("politics", "negative"): [
        "Protesters in {LOC} denounced the unpopular tax increase as unfair .",
        "Senator {PER} resigned after a damaging scandal over party funds .",
        "Talks at {ORG} collapsed , leaving the crisis in {LOC} unresolved .",
        "Critics said the government in {LOC} handled the floods badly and too slowly .",
        "{PARTY} lost heavily in the local elections , a bitter blow for leader {PER} .",
        "Opposition leader {PER} called the new budget a disaster for families .",
    ],
    ("politics", "neutral"): [
        "{PER} will meet officials from {ORG} in {LOC} on Tuesday .",
        "The parliament in {LOC} will vote on the bill next month .",
        "{PARTY} published a list of candidates for the regional elections .",
        "Minister {PER} travelled to {LOC} for a two-day visit .",
        "The committee chaired by {PER} will hear evidence from {ORG} .",
    ],
    ("entertainment", "positive"): [
        "The new film by director {PER} is a moving and beautifully shot story .",
        "{PER} gave a wonderful concert in {LOC} , and the crowd loved every song .",
        "Critics adored the latest album from {BAND} , calling it a masterpiece .",
        "The musical opened in {LOC} to glowing reviews and sold-out shows .",
        "{PER} is brilliant in the lead role , funny and heartbreaking at once .",
        "{ORG} released a charming animated series that families in {LOC} enjoyed .",
    ],
    ("entertainment", "negative"): [
        "The new film by director {PER} is dull , confusing and far too long .",
        "The concert in {LOC} was a mess , with terrible sound and a late start .",
        "Critics panned the latest album from {BAND} as lazy and forgettable .",
        "{PER} gives a wooden performance in a boring remake .",
        "Fans in {LOC} were disappointed when {BAND} cancelled the tour at the last minute .",
        "The series from {ORG} started well but ended with a weak , predictable finale .",
    ],
    ("entertainment", "neutral"): [
        "{PER} will host the film festival in {LOC} this year .",
        "{ORG} announced that the second season will be released in April .",
        "{BAND} play a concert in {LOC} on Friday night .",
        "{PER} is filming a historical drama in {LOC} .",
        "The museum in {LOC} will show costumes from classic films .",
    ],
}

# Organisations that fit each topic, so a filled sentence stays plausible.
ORG_BY_TOPIC = {
    "business": [
        "Northwind Labs",
        "Siemens",
        "Toyota",
        "Unilever",
        "Nestlé",
        "Greenfield Bank",
        "Apex Robotics",
        "Harbor Foods",
        "Silverline Airways",
        "Redstone Capital",
        "Cedar Telecom",
        "Summit Energy",
        "Crestview Motors",
    ],
    "science": ["Northwind Labs", "NASA", "Orion Pharma", "Helix Biotech", "Novagen Institute", "Apex Robotics"],
    "sports": ["Real Madrid", "Ajax", "the Boston Celtics", "Harbor City FC", "Lakeside United", "the Nairobi Lions"],
    "politics": ["the European Commission", "the United Nations", "the African Union", "the Council of Europe"],
    "PARTY": ["the Liberal Party", "the Green Alliance", "the Labour Party", "the Civic Union", "the Farmers' League"],
    "entertainment": [
        "Bluewave Media",
        "Pixel Forge Studios",
        "Brightside Records",
        "The Velvet Owls",
        "Moonlight Pictures",
        "Northstar Studios",
    ],
    "BAND": ["The Velvet Owls", "Echo Park", "Silver Tides", "Brightside Records", "Paper Lanterns"],
}


def _fill(template: str, topic: str, rng: random.Random) -> tuple[list[str], list[str]]:
    """Fill the slots of one template and return (tokens, BIO tags)."""
    tokens, tags = [], []
    used = set()
    for piece in template.split(" "):
        if piece in ("{PER}", "{ORG}", "{LOC}", "{PARTY}", "{BAND}"):
            slot = piece[1:-1]
            kind = slot if slot in ("PER", "ORG", "LOC") else "ORG"
            pool = {"PER": PER, "ORG": ORG_BY_TOPIC[topic], "LOC": LOC}.get(slot) or ORG_BY_TOPIC[slot]
            name = rng.choice([n for n in pool if n not in used])
            used.add(name)
            words = name.split(" ")
            # A leading "the" is an ordinary word, not part of the entity span.
            if words[0] == "the":
                tokens.append("the")
                tags.append("O")
                words = words[1:]
            for i, w in enumerate(words):
                tokens.append(w)
                tags.append(("B-" if i == 0 else "I-") + kind)
        else:
            tokens.append(piece)
            tags.append("O")
    # Capitalise a sentence-initial "the".
    if tokens[0] == "the":
        tokens[0] = "The"
    return tokens, tags


def generate(n_train_per_template: int = 6, n_eval_per_template: int = 7) -> tuple[list[dict], list[dict]]:
    """The last template of each (topic, sentiment) group is held out for eval, so eval tests generalisation to
    unseen sentence patterns (not only unseen names) and the splits share no sentence."""
    rng = random.Random(SEED)
    train, eval_, seen = [], [], set()
    for (topic, sentiment), templates in T.items():
        for idx, template in enumerate(templates):
            split, n = (eval_, n_eval_per_template) if idx == len(templates) - 1 else (train, n_train_per_template)
            made, tries = 0, 0
            while made < n and tries < 200:
                tries += 1
                tokens, tags = _fill(template, topic, rng)
                text = " ".join(tokens)
                if text in seen:
                    continue
                seen.add(text)
                split.append({"text": text, "tokens": tokens, "ner_tags": tags, "topic": topic, "sentiment": sentiment})
                made += 1
    rng.shuffle(train)
    rng.shuffle(eval_)
    return train, eval_


def main() -> None:
    train, eval_ = generate()
    for name, rows in (("default_train.jsonl", train), ("default_eval.jsonl", eval_)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
