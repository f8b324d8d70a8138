#!/usr/bin/env python3
"""Generate the illustrative UPSC sample dataset for kdcache.

This script composes short, synthetic "newspaper article" texts from
hand-written topic vocabularies and sentence templates, one set per class,
and writes two JSON Lines files next to it:

    golden.jsonl   120 rows  (stands in for a human-verified set)
    silver.jsonl   400 rows  (stands in for a teacher-labelled set)

Every row has exactly the fields ``id``, ``title``, ``text``, ``relevant``
("yes"/"no") and ``gs_paper`` ("GS1".."GS4" or "none"; "none" exactly when
``relevant`` is "no").

The data is ILLUSTRATIVE ONLY: it is not real news and the labels are not
real UPSC labels. Labels are clean by construction (each text is built from
the templates of a single class).

The output is deterministic: it uses only the standard library and a seeded
``random.Random``, so running the script twice yields byte-identical files.

Usage:
    python examples/upsc/make_sample.py [--outdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

GOLDEN_SEED = 1729
SILVER_SEED = 4104
GOLDEN_N = 120
SILVER_N = 400

LABELS = ["none", "GS1", "GS2", "GS3", "GS4"]
# Target share of each label; "none" absorbs any rounding remainder.
SHARES = {"none": 0.40, "GS1": 0.15, "GS2": 0.15, "GS3": 0.15, "GS4": 0.15}

MIN_WORDS = 40
MAX_WORDS = 90

# ---------------------------------------------------------------------------
# Shared vocabulary (used by every class)
# ---------------------------------------------------------------------------

# (city, state) pairs so that a city is never placed in the wrong state.
PLACES = [
    ("Pune", "Maharashtra"), ("Nagpur", "Maharashtra"),
    ("Lucknow", "Uttar Pradesh"), ("Varanasi", "Uttar Pradesh"),
    ("Bhopal", "Madhya Pradesh"), ("Indore", "Madhya Pradesh"),
    ("Guwahati", "Assam"), ("Kochi", "Kerala"),
    ("Thiruvananthapuram", "Kerala"), ("Jaipur", "Rajasthan"),
    ("Jodhpur", "Rajasthan"), ("Patna", "Bihar"),
    ("Bhubaneswar", "Odisha"), ("Mysuru", "Karnataka"),
    ("Bengaluru", "Karnataka"), ("Madurai", "Tamil Nadu"),
    ("Coimbatore", "Tamil Nadu"), ("Ranchi", "Jharkhand"),
    ("Dehradun", "Uttarakhand"), ("Shillong", "Meghalaya"),
    ("Surat", "Gujarat"), ("Vadodara", "Gujarat"),
    ("Visakhapatnam", "Andhra Pradesh"), ("Ludhiana", "Punjab"),
    ("Raipur", "Chhattisgarh"), ("Shimla", "Himachal Pradesh"),
    ("Kolkata", "West Bengal"), ("Hyderabad", "Telangana"),
    ("Gangtok", "Sikkim"), ("Panaji", "Goa"),
    ("Agartala", "Tripura"), ("Imphal", "Manipur"),
    ("Kohima", "Nagaland"), ("Aizawl", "Mizoram"),
    ("Hisar", "Haryana"), ("Karnal", "Haryana"),
]

FIRST_NAMES = [
    "Aarav", "Kabir", "Meera", "Tara", "Vihaan", "Anaya", "Rohan", "Ishita",
    "Dev", "Kiara", "Arjun", "Naina", "Siddharth", "Zoya", "Rahul", "Priya",
    "Neel", "Sana", "Aditya", "Riya", "Karan", "Diya", "Vikram", "Leela",
]
LAST_NAMES = [
    "Malhotra", "Sen", "Iyer", "Kulkarni", "Bose", "Reddy", "Khanna",
    "Menon", "Rathore", "Das", "Joshi", "Pillai", "Grewal", "Nair",
    "Chatterjee", "Deshpande", "Sethi", "Banerjee", "Verma", "Hegde",
]

NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]

SHARED_SLOTS = {
    "month": ["January", "February", "March", "April", "May", "June", "July",
              "August", "September", "October", "November", "December"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                "Saturday", "Sunday"],
}


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# Numeric slots: each is a function of the RNG that returns a string.
NUMERIC_SLOTS = {
    "n_small": lambda r: r.choice(NUMBER_WORDS[:8]),
    "n_centuries": lambda r: r.choice(NUMBER_WORDS[1:]),
    "n_years": lambda r: r.choice(["five", "six", "seven", "eight", "ten"]),
    "n_yrs": lambda r: r.choice(["three", "four", "five"]),
    "n_mid": lambda r: str(r.randrange(20, 260, 5)),
    "big_n": lambda r: _fmt_int(r.randrange(1200, 96000, 50)),
    "pct": lambda r: f"{r.uniform(3.0, 28.0):.1f}",
    "pct_small": lambda r: f"{r.uniform(2.1, 6.4):.1f}",
    "gdp": lambda r: f"{r.uniform(5.8, 7.6):.1f}",
    "rd": lambda r: f"{r.uniform(0.6, 0.8):.2f}",
    "lakh": lambda r: str(r.randrange(5, 121)),
    "lakh2": lambda r: f"{r.uniform(1.5, 12.0):.1f}",
    "msp": lambda r: str(r.randrange(50, 305, 5)),
    "crore": lambda r: _fmt_int(r.randrange(500, 20000, 50)),
    "gw": lambda r: str(r.randrange(8, 26)),
    "season": lambda r: r.choice(["second", "third", "fourth", "fifth"]),
    "session": lambda r: r.choice(["monsoon", "winter", "budget"]),
    "margin": lambda r: str(r.randrange(5, 81)),
    "runs": lambda r: str(r.randrange(45, 121)),
    "target": lambda r: str(r.randrange(140, 221)),
    "balls": lambda r: str(r.randrange(2, 16)),
    "wkts": lambda r: r.choice(["four", "five", "six"]),
    "low": lambda r: str(r.randrange(88, 140)),
    "goals": lambda r: str(r.randrange(2, 5)),
    "pos": lambda r: r.choice(["second", "third", "fourth", "fifth"]),
    "age": lambda r: str(r.randrange(19, 32)),
    "likes": lambda r: str(r.randrange(2, 31)),
    "stars": lambda r: r.choice(["2", "2.5", "3", "3.5", "4"]),
    "mp": lambda r: r.choice(["48", "50", "64", "108", "200"]),
    "mah": lambda r: str(r.randrange(4500, 6100, 100)),
    "price": lambda r: _fmt_int(r.randrange(10, 60) * 1000 - 1),
    "hours": lambda r: str(r.randrange(24, 49)),
    "mins": lambda r: str(r.randrange(15, 46, 5)),
}

# ---------------------------------------------------------------------------
# Class vocabularies and templates
#
# Each class has:
#   slots:    class-specific slot vocabularies
#   closers:  optional closing sentences (class-level; a subtopic may
#             override them with its own "closers" list)
#   subtopics: list of dicts with
#       stories: list of (lead sentence template, [headline templates]) or
#                (lead, [headlines], [body sentences that fit only this story])
#       bodies:  list of body sentence templates that fit any story
# ---------------------------------------------------------------------------

CLASSES = {}

# ----------------------------- GS1 -----------------------------------------
CLASSES["GS1"] = {
    "slots": {
        # An era carries the artefacts plausible for it and the states where
        # such finds are made, so that texts do not pair e.g. a Chola temple
        # with Punjab.
        "era": [
            {"era": "Harappan", "states": ["Gujarat", "Rajasthan", "Punjab",
                                           "Haryana"],
             "artefact": ["inscribed steatite seals", "terracotta figurines",
                          "carnelian beads", "shell bangles",
                          "painted pottery", "a brick-lined drain"]},
            {"era": "Mauryan", "states": ["Bihar", "Odisha", "Uttar Pradesh",
                                          "Madhya Pradesh"],
             "artefact": ["punch-marked coins",
                          "fragments of a polished stone pillar",
                          "northern black polished ware pottery",
                          "terracotta figurines"]},
            {"era": "Gupta", "states": ["Uttar Pradesh", "Bihar",
                                        "Madhya Pradesh"],
             "artefact": ["gold coins", "sculpted temple panels",
                          "terracotta plaques",
                          "seals bearing Brahmi script"]},
            {"era": "Chola", "states": ["Tamil Nadu"],
             "artefact": ["bronze idols", "stone inscriptions in Tamil",
                          "copper-plate grants",
                          "the foundations of a temple"]},
            {"era": "Pandya", "states": ["Tamil Nadu"],
             "artefact": ["Tamil-Brahmi inscriptions", "copper coins",
                          "black-and-red ware pottery"]},
            {"era": "Chera", "states": ["Kerala"],
             "artefact": ["shards of Roman amphorae", "glass beads",
                          "copper coins"]},
            {"era": "Satavahana", "states": ["Maharashtra", "Andhra Pradesh",
                                             "Telangana"],
             "artefact": ["lead coins", "the remains of a brick stupa",
                          "Prakrit inscriptions", "beads and bangles"]},
            {"era": "Kushana", "states": ["Uttar Pradesh", "Punjab"],
             "artefact": ["copper coins", "red sandstone sculptures",
                          "terracotta figurines",
                          "the remains of a Buddhist monastery"]},
            {"era": "Pallava", "states": ["Tamil Nadu"],
             "artefact": ["rock-cut sculptures", "stone inscriptions",
                          "the foundations of a temple"]},
            {"era": "Rashtrakuta", "states": ["Karnataka", "Maharashtra"],
             "artefact": ["stone inscriptions", "hero stones",
                          "copper-plate grants", "temple ruins"]},
            {"era": "Vijayanagara", "states": ["Karnataka", "Andhra Pradesh"],
             "artefact": ["hero stones", "copper coins",
                          "sections of a fortification wall",
                          "stone inscriptions"]},
            {"era": "Kakatiya", "states": ["Telangana"],
             "artefact": ["carved temple pillars", "stone inscriptions",
                          "sections of a fortification wall"]},
            {"era": "Hoysala", "states": ["Karnataka"],
             "artefact": ["sculpted temple panels", "hero stones",
                          "stone inscriptions"]},
            {"era": "Megalithic", "states": ["Kerala", "Tamil Nadu",
                                             "Telangana", "Meghalaya"],
             "artefact": ["burial urns", "iron tools", "stone circles",
                          "black-and-red ware pottery"]},
            {"era": "Pala", "states": ["West Bengal", "Bihar"],
             "artefact": ["bronze Buddhist images", "terracotta plaques",
                          "the remains of a monastery", "stone sculptures"]},
            {"era": "Ahom", "states": ["Assam"],
             "artefact": ["brick structures", "copper-plate inscriptions",
                          "burial mounds known as maidams"]},
            {"era": "Eastern Ganga", "states": ["Odisha"],
             "artefact": ["temple ruins", "stone inscriptions",
                          "sculpted panels"]},
        ],
        "agency": ["the Archaeological Survey of India",
                   "the state archaeology department",
                   "a team of university archaeologists",
                   "the Indian Council of Historical Research"],
        # Each art form is tied to the state it belongs to.
        "art_form": [
            {"art_form": "Madhubani painting", "states": ["Bihar"]},
            {"art_form": "Pattachitra scroll painting", "states": ["Odisha"]},
            {"art_form": "Kathakali", "states": ["Kerala"]},
            {"art_form": "Mohiniyattam", "states": ["Kerala"]},
            {"art_form": "Bharatanatyam", "states": ["Tamil Nadu"]},
            {"art_form": "Warli art", "states": ["Maharashtra"]},
            {"art_form": "Kalamkari textile art", "states": ["Andhra Pradesh"]},
            {"art_form": "Kuchipudi", "states": ["Andhra Pradesh"]},
            {"art_form": "Chhau dance", "states": ["Jharkhand", "Odisha"]},
            {"art_form": "Sohrai painting", "states": ["Jharkhand"]},
            {"art_form": "Yakshagana", "states": ["Karnataka"]},
            {"art_form": "Bidriware metalcraft", "states": ["Karnataka"]},
            {"art_form": "Gond painting", "states": ["Madhya Pradesh"]},
            {"art_form": "Thangka painting", "states": ["Sikkim"]},
            {"art_form": "Sattriya dance", "states": ["Assam"]},
            {"art_form": "Kalbelia folk dance", "states": ["Rajasthan"]},
            {"art_form": "Phad painting", "states": ["Rajasthan"]},
            {"art_form": "Manipuri dance", "states": ["Manipur"]},
            {"art_form": "Cheriyal scroll painting", "states": ["Telangana"]},
            {"art_form": "Chikankari embroidery", "states": ["Uttar Pradesh"]},
            {"art_form": "Dhokra metal casting", "states": ["Chhattisgarh"]},
            {"art_form": "Phulkari embroidery", "states": ["Punjab"]},
            {"art_form": "Kantha embroidery", "states": ["West Bengal"]},
            {"art_form": "Chamba rumal embroidery",
             "states": ["Himachal Pradesh"]},
            {"art_form": "Aipan folk art", "states": ["Uttarakhand"]},
            {"art_form": "Garba", "states": ["Gujarat"]},
            {"art_form": "Cheraw bamboo dance", "states": ["Mizoram"]},
            {"art_form": "Hojagiri dance", "states": ["Tripura"]},
            {"art_form": "Wangala dance", "states": ["Meghalaya"]},
        ],
        "movement": ["the Quit India Movement", "the Non-Cooperation Movement",
                     "the Salt Satyagraha", "the Swadeshi Movement",
                     "the Revolt of 1857", "the Home Rule Movement",
                     "the Khilafat Movement",
                     "the Civil Disobedience Movement"],
        # Each leader carries a phrase describing what they are remembered for.
        "leader": [
            {"leader": "Gopal Krishna Gokhale",
             "legacy": "championing moderate politics and public education"},
            {"leader": "Bal Gangadhar Tilak",
             "legacy": "the call for Swaraj and fiery vernacular journalism"},
            {"leader": "Sarojini Naidu",
             "legacy": "bringing women into the national movement"},
            {"leader": "Birsa Munda",
             "legacy": "leading the Ulgulan for tribal land rights"},
            {"leader": "Rani Gaidinliu",
             "legacy": "resisting colonial rule in the Naga hills"},
            {"leader": "Alluri Sitarama Raju",
             "legacy": "leading the Rampa rebellion"},
            {"leader": "Savitribai Phule",
             "legacy": "pioneering the education of girls"},
            {"leader": "Raja Ram Mohan Roy",
             "legacy": "campaigning against sati and for social reform"},
            {"leader": "Dadabhai Naoroji",
             "legacy": "the drain of wealth theory"},
            {"leader": "Annie Besant",
             "legacy": "leading the Home Rule League"},
            {"leader": "Jyotirao Phule",
             "legacy": "the struggle against caste discrimination"},
            {"leader": "Subhas Chandra Bose",
             "legacy": "leading the Indian National Army"},
            {"leader": "Maulana Abul Kalam Azad",
             "legacy": "promoting education and communal unity"},
            {"leader": "Periyar E. V. Ramasamy",
             "legacy": "founding the Self-Respect Movement"},
        ],
        "social_theme": ["internal migration", "rapid urbanisation",
                         "the participation of women in the workforce",
                         "the ageing of the population",
                         "caste-based discrimination",
                         "the declining child sex ratio",
                         "the weakening of the joint family",
                         "the erosion of tribal languages", "regionalism",
                         "communal harmony", "the rise of nuclear families",
                         "rural-to-urban migration"],
        "river": ["Brahmaputra", "Godavari", "Narmada", "Krishna", "Mahanadi",
                  "Ganga", "Kaveri", "Teesta", "Chambal", "Sutlej", "Tapi",
                  "Son"],
        "geo": ["the southwest monsoon", "western disturbances",
                "the El Nino cycle", "the Indian Ocean Dipole",
                "the subtropical jet stream", "the retreating monsoon",
                "ocean currents in the Arabian Sea"],
        "landform": ["the Western Ghats", "the Deccan Plateau",
                     "the Thar Desert", "the Himalayan foothills",
                     "the Eastern Ghats", "the Chota Nagpur Plateau",
                     "the Indo-Gangetic plain", "the Shivalik range",
                     "the Aravalli hills", "the Sundarbans delta"],
    },
    "closers": [
        "Experts said the work deepens understanding of India's history and "
        "cultural diversity.",
        "The findings will be presented at a national seminar in {city} in "
        "{month}.",
        "Scholars hope the study will enrich the teaching of Indian culture, "
        "history and society.",
    ],
    "subtopics": [
        {   # archaeology and ancient history
            "stories": [
                ("Excavations near {city} in {state} have unearthed {artefact} "
                 "that archaeologists attribute to the {era} period.",
                 ["Excavation near {city} unearths {era}-era artefacts",
                  "{era} settlement traced in {state} dig"]),
                ("{agency} has reported the discovery of {artefact} at a mound "
                 "close to {city}, offering fresh evidence of {era} settlement "
                 "in {state}.",
                 ["Mound near {city} yields {era} finds",
                  "New evidence of {era} settlement in {state}"]),
                ("A {season} excavation season at an ancient site outside "
                 "{city} has revealed {artefact} linked to the {era} phase of "
                 "Indian history.",
                 ["{era} relics surface at ancient site near {city}",
                  "Archaeologists date {state} finds to {era} times"]),
            ],
            "bodies": [
                "Historians say the finds could help reconstruct trade routes, "
                "craft traditions and burial practices of ancient India.",
                "The layers of the site show continuous habitation for nearly "
                "{n_centuries} centuries, according to the excavation report.",
                "Experts are comparing the finds with material from other "
                "excavated sites to refine the dating.",
                "Researchers believe the settlement was an important centre of "
                "craft production and trade.",
                "The discovery adds to what is known about town planning and "
                "the social life of early communities in the region.",
            ],
        },
        {   # art and culture
            "stories": [
                ("A week-long cultural festival in {city} showcased "
                 "{art_form}, one of the oldest living art traditions of "
                 "{state}.",
                 ["Festival in {city} celebrates {art_form}",
                  "{art_form} takes centre stage in {city}"]),
                ("Practitioners of {art_form} in {state} have sought a "
                 "Geographical Indication tag to protect the heritage "
                 "tradition from cheap imitations.",
                 ["GI tag push for {art_form} gains ground",
                  "{state} artisans seek protection for {art_form}"]),
                ("Only about {n_small} hundred artists in and around {city} "
                 "still practise {art_form}, a survey by the {state} culture "
                 "department has found.",
                 ["Reviving {art_form}: a heritage tradition at a crossroads",
                  "Few hands left to carry on {art_form} in {state}"]),
            ],
            "bodies": [
                "Scholars trace the roots of the tradition to ritual practice, "
                "folk narratives and the patronage of regional courts.",
                "The tradition draws on themes from the epics, local deities "
                "and seasonal festivals.",
                "Cultural historians say the style reflects the syncretic "
                "heritage that shaped Indian art across centuries.",
                "Young artists are blending classical motifs with contemporary "
                "themes to keep the art form alive.",
                "The culture department plans to document the techniques, "
                "motifs and oral histories associated with the tradition.",
            ],
        },
        {   # modern Indian history and the freedom struggle
            "stories": [
                ("Newly digitised archives in {city} shed light on the role of "
                 "{state} in {movement}.",
                 ["Archives in {city} shed new light on {movement}",
                  "{state} and {movement}: what the records reveal"]),
                ("An exhibition in {city} marks the anniversary of {movement} "
                 "with photographs, letters and newspapers from the period.",
                 ["Exhibition in {city} revisits {movement}",
                  "Remembering {movement} through its archives"]),
                ("Historians gathered in {city} to revisit the life of "
                 "{leader}, remembered for {legacy}.",
                 ["{leader}'s legacy revisited",
                  "Seminar in {city} recalls {leader}'s role in modern "
                  "India"],
                 ["Speakers said the leader's writings and speeches remain "
                  "essential reading for students of modern Indian history."]),
            ],
            "bodies": [
                "Letters, pamphlets and police records from the colonial "
                "period show how the national movement spread to villages.",
                "The documents describe the participation of peasants, "
                "students and women in the struggle against British rule.",
                "Historians noted that the social reform debates of that era "
                "continue to shape modern India.",
                "The colonial administration responded with arrests, press "
                "censorship and heavy fines, the records reveal.",
                "Researchers say the material will help students understand "
                "the regional dimensions of the freedom movement.",
            ],
        },
        {   # Indian society
            "stories": [
                ("A new sociological study of households in {state} examines "
                 "{social_theme} and its impact on Indian society.",
                 ["Study maps {social_theme} in {state}",
                  "How {social_theme} is reshaping society in {state}"]),
                ("Researchers surveying {big_n} families in {city} found that "
                 "{social_theme} is changing family structures and social "
                 "relations.",
                 ["Survey of {city} families flags {social_theme}",
                  "Family life in {city} shifts with {social_theme}"]),
                ("{social_theme} has emerged as a defining feature of social "
                 "change in {state}, according to a university study.",
                 ["Sociologists track {social_theme} in {state}",
                  "{social_theme} and social change in {state}"]),
            ],
            "bodies": [
                "The authors link the trend to education, urbanisation and "
                "changing aspirations among young people.",
                "Sociologists say caste, gender and regional identities "
                "continue to shape how communities respond to such change.",
                "About {pct} per cent of respondents said traditional roles "
                "within the family had shifted over the past decade.",
                "The study calls for a closer look at how diversity and social "
                "cohesion can be preserved as society modernises.",
                "Women's groups and community elders interviewed for the study "
                "described both new opportunities and new pressures.",
            ],
        },
        {   # geography
            "stories": [
                ("Geographers studying the {river} basin say the river has "
                 "shifted its course by nearly {n_small} kilometres over the "
                 "past century.",
                 ["Shifting course of the {river} puzzles geographers",
                  "Mapping a century of change in the {river} basin"],
                 ["Geographers link the shift to sediment load, floods and "
                  "changes in the river's meanders.",
                  "Old survey maps show villages that once stood on one bank "
                  "now lie on the other."]),
                ("A study of {geo} explains why rainfall patterns over "
                 "{landform} have varied so sharply in recent decades.",
                 ["How {geo} shapes rainfall over {landform}",
                  "Decoding rainfall variability over {landform}"],
                 ["Scientists point to the interaction of pressure belts, "
                  "winds and ocean temperatures in explaining the pattern.",
                  "The study traces how relief features force moist winds to "
                  "rise and shed rain on the windward side."]),
                ("Researchers mapping {landform} have described how relief, "
                 "drainage and soil types shape settlement patterns in the "
                 "region.",
                 ["Mapping the physical geography of {landform}",
                  "Relief and drainage of {landform} under the lens"]),
            ],
            "bodies": [
                "The physical geography of the region, from its river systems "
                "to its relief features, influences where people live and "
                "farm.",
                "The distribution of minerals, forests and water resources in "
                "the area has long shaped the location of industries.",
                "Satellite imagery and old topographic maps were compared to "
                "trace changes in drainage and landforms.",
                "Geographers say such studies help explain the climatic "
                "diversity of the Indian subcontinent.",
            ],
        },
    ],
}

# ----------------------------- GS2 -----------------------------------------
CLASSES["GS2"] = {
    "slots": {
        "article": ["Article 14", "Article 19", "Article 21", "Article 32",
                    "Article 142", "Article 200", "Article 226",
                    "Article 243", "Article 280", "Article 324",
                    "Article 356", "Article 368"],
        "body_c": ["the Election Commission", "the Finance Commission",
                   "the Comptroller and Auditor General",
                   "the Union Public Service Commission",
                   "the National Human Rights Commission",
                   "the Inter-State Council",
                   "the Central Information Commission",
                   "the National Commission for Women"],
        "country": ["Japan", "France", "Australia", "Bangladesh", "Nepal",
                    "Sri Lanka", "Indonesia", "Brazil", "Egypt", "Kenya",
                    "Vietnam", "Germany", "the United Arab Emirates",
                    "the Maldives", "Bhutan", "South Africa", "Mauritius"],
        "grouping": ["BRICS", "the Shanghai Cooperation Organisation",
                     "the Quad", "the G20", "ASEAN", "BIMSTEC",
                     "the Indian Ocean Rim Association",
                     "the IBSA Dialogue Forum"],
        "group": ["persons with disabilities", "Scheduled Tribe communities",
                  "senior citizens", "manual scavengers", "transgender persons",
                  "migrant workers", "children in care institutions",
                  "landless agricultural labourers", "single women",
                  "denotified tribes"],
        "scheme_area": ["school nutrition", "maternal health",
                        "primary education", "public health insurance",
                        "pre-school education at anganwadis",
                        "scholarships for students"],
    },
    "closers": [
        "The matter is expected to come up for discussion in Parliament "
        "during the {session} session.",
        "Observers say the outcome will have implications for governance "
        "and constitutional practice.",
        "A detailed policy note is expected by the end of {month}.",
    ],
    "subtopics": [
        {   # polity and constitution
            "stories": [
                ("The Supreme Court has referred a batch of petitions on the "
                 "interpretation of {article} of the Constitution to a "
                 "five-judge bench.",
                 ["Supreme Court to examine scope of {article}",
                  "Constitution bench to hear pleas on {article}"]),
                ("The {state} government has approached the Supreme Court, "
                 "arguing that delays by the Governor in granting assent to "
                 "bills undermine federalism.",
                 ["Federalism debate: {state} moves court over Governor's "
                  "role",
                  "{state} challenges delay in assent to bills"]),
                ("A parliamentary standing committee has begun reviewing the "
                 "independence and functioning of {body_c}.",
                 ["Parliament panel reviews functioning of {body_c}",
                  "House committee examines autonomy of {body_c}"]),
                ("The High Court has asked the {state} legislature "
                 "to explain how a new law squares with {article} and the "
                 "basic structure of the Constitution.",
                 ["High Court questions {state} law under {article}",
                  "{state} law faces constitutional test in High Court"]),
            ],
            "bodies": [
                "Petitioners argue that the provision must be read in harmony "
                "with the fundamental rights guaranteed by the Constitution.",
                "Constitutional experts say the case could clarify the balance "
                "between the Union and the states under the federal scheme.",
                "The Centre has defended its position, citing the separation "
                "of powers and the role of Parliament in making laws.",
                "Legal scholars noted that the basic structure doctrine limits "
                "the power of Parliament to amend the Constitution.",
                "The bench observed that constitutional bodies must remain "
                "independent of the executive to retain public trust.",
            ],
        },
        {   # governance
            "stories": [
                ("The {state} government has launched a single-window "
                 "e-governance portal that lets citizens in {city} track over "
                 "{n_mid} public services online.",
                 ["{state} rolls out e-governance portal for citizen services",
                  "{city} residents can now track {n_mid} services online"]),
                ("A social audit of panchayat works in {state} has found that "
                 "nearly {pct} per cent of projects lacked proper records.",
                 ["Social audit finds gaps in panchayat works in {state}",
                  "Panchayat records in {state} fail social audit test"]),
                ("Over {big_n} appeals under the Right to Information Act are "
                 "pending before the information commission in {state}, a "
                 "transparency group has said.",
                 ["RTI appeals pile up in {state} as commission posts lie "
                  "vacant",
                  "{big_n} RTI appeals pending in {state}"]),
                ("The municipal corporation of {city} has adopted a citizen "
                 "charter that fixes deadlines for services such as birth "
                 "certificates and water connections.",
                 ["{city} civic body adopts citizen charter",
                  "Citizen charter sets service deadlines in {city}"]),
            ],
            "bodies": [
                "Officials say the reform is meant to improve transparency, "
                "accountability and the delivery of public services.",
                "Activists argue that local bodies need more funds, functions "
                "and functionaries to make decentralisation meaningful.",
                "The report recommends grievance redressal mechanisms and "
                "regular social audits to strengthen governance.",
                "Experts note that the 73rd and 74th Amendments intended "
                "panchayats and municipalities to be genuine institutions of "
                "self-government.",
                "Civil society groups have called for filling vacancies and "
                "setting time limits for disposing of complaints.",
            ],
        },
        {   # international relations
            "stories": [
                ("India and {country} signed {n_small} agreements covering "
                 "trade, connectivity and defence cooperation after bilateral "
                 "talks in New Delhi.",
                 ["India, {country} sign pacts to deepen strategic "
                  "partnership",
                  "India and {country} ink {n_small} agreements"]),
                ("At the {grouping} summit, India called for reform of "
                 "multilateral institutions and a stronger voice for the "
                 "Global South.",
                 ["{grouping} summit: India pushes for reformed "
                  "multilateralism",
                  "India seeks Global South voice at {grouping}"]),
                ("The External Affairs Minister held talks with the foreign "
                 "minister of {country} on the sidelines of the UN General "
                 "Assembly, reviewing the bilateral relationship.",
                 ["India, {country} review bilateral ties at UN meet",
                  "External Affairs Minister meets {country} foreign "
                  "minister"]),
                ("India and {country} have agreed on a roadmap for maritime "
                 "cooperation, including joint naval exercises and "
                 "information sharing in the Indian Ocean.",
                 ["India and {country} agree on maritime cooperation roadmap",
                  "India, {country} to step up Indian Ocean cooperation"]),
            ],
            "bodies": [
                "Discussions covered the Indo-Pacific, energy security and "
                "cooperation at the United Nations.",
                "Diplomats said the engagement reflected India's neighbourhood "
                "first policy and its growing role in regional diplomacy.",
                "A joint statement stressed a rules-based international order, "
                "freedom of navigation and respect for sovereignty.",
                "India also sought support for reform of the UN Security "
                "Council and a permanent seat for itself.",
                "Analysts say the outcome will shape India's foreign policy "
                "priorities in the region for the coming decade.",
            ],
        },
        {   # social justice, health, education, welfare
            "stories": [
                ("A parliamentary committee has found that welfare schemes "
                 "meant for {group} in {state} are reaching fewer than half of "
                 "the intended beneficiaries.",
                 ["Report flags gaps in welfare schemes for {group}",
                  "Welfare for {group} in {state} falls short, says panel"]),
                ("The {state} government has expanded its programme for "
                 "{scheme_area}, aiming to cover {big_n} more households in "
                 "the coming year.",
                 ["{state} expands {scheme_area} coverage",
                  "More households to get {scheme_area} support in {state}"]),
                ("A study by a {city}-based policy group has called for "
                 "stronger legal safeguards and inclusive policies for "
                 "{group}.",
                 ["Panel seeks stronger safeguards for {group}",
                  "Inclusive policies for {group} urged in {city} study"]),
            ],
            "bodies": [
                "The report points to gaps in identification, delayed "
                "payments and poor awareness among vulnerable sections.",
                "Experts say health, education and social security must be "
                "treated as rights rather than charity.",
                "The committee recommended better coordination between "
                "ministries and regular monitoring of outcomes.",
                "Activists stressed that the Constitution's promise of social "
                "justice requires targeted support for marginalised "
                "communities.",
                "Data show that about {pct} per cent of eligible households in "
                "the state are still outside the social security net.",
            ],
        },
    ],
}

# ----------------------------- GS3 -----------------------------------------
CLASSES["GS3"] = {
    "slots": {
        # Crops, species, hazards and threats are tied to plausible states.
        "crop": [
            {"crop": "wheat", "states": ["Punjab", "Haryana", "Uttar Pradesh",
                                         "Madhya Pradesh", "Rajasthan"]},
            {"crop": "paddy", "states": ["Punjab", "West Bengal", "Odisha",
                                         "Andhra Pradesh", "Telangana",
                                         "Chhattisgarh", "Tamil Nadu"]},
            {"crop": "pulses", "states": ["Madhya Pradesh", "Rajasthan",
                                          "Maharashtra", "Karnataka"]},
            {"crop": "mustard", "states": ["Rajasthan", "Haryana",
                                           "Madhya Pradesh"]},
            {"crop": "cotton", "states": ["Gujarat", "Maharashtra",
                                          "Telangana"]},
            {"crop": "sugarcane", "states": ["Uttar Pradesh", "Maharashtra",
                                             "Karnataka"]},
            {"crop": "millets", "states": ["Rajasthan", "Karnataka",
                                           "Odisha", "Maharashtra"]},
            {"crop": "soybean", "states": ["Madhya Pradesh", "Maharashtra"]},
            {"crop": "maize", "states": ["Karnataka", "Bihar",
                                         "Madhya Pradesh"]},
            {"crop": "groundnut", "states": ["Gujarat", "Andhra Pradesh",
                                             "Tamil Nadu"]},
        ],
        "sector": ["MSME", "manufacturing", "services", "textile",
                   "electronics", "housing", "logistics"],
        "species": [
            {"species": "tiger", "states": ["Madhya Pradesh", "Maharashtra",
                                            "Karnataka", "Uttarakhand",
                                            "Assam"]},
            {"species": "Great Indian Bustard",
             "states": ["Rajasthan", "Gujarat"]},
            {"species": "Asiatic lion", "states": ["Gujarat"]},
            {"species": "one-horned rhinoceros",
             "states": ["Assam", "West Bengal"]},
            {"species": "Gangetic dolphin",
             "states": ["Bihar", "Uttar Pradesh", "Assam"]},
            {"species": "snow leopard",
             "states": ["Himachal Pradesh", "Uttarakhand", "Sikkim"]},
            {"species": "olive ridley turtle",
             "states": ["Odisha", "Andhra Pradesh", "Tamil Nadu"]},
            {"species": "Nilgiri tahr", "states": ["Tamil Nadu", "Kerala"]},
            {"species": "hoolock gibbon",
             "states": ["Assam", "Meghalaya", "Nagaland"]},
            {"species": "red panda", "states": ["Sikkim"]},
            {"species": "Asian elephant",
             "states": ["Kerala", "Karnataka", "Odisha", "Jharkhand"]},
        ],
        "mission": ["a navigation satellite", "an earth observation satellite",
                    "a weather satellite", "a communication satellite",
                    "a small satellite launch vehicle",
                    "an ocean monitoring satellite"],
        "tech": ["quantum computing", "semiconductor fabrication",
                 "genome sequencing", "green hydrogen",
                 "artificial intelligence", "battery storage", "gene editing",
                 "advanced materials"],
        "threat": [
            {"threat": "left-wing extremism",
             "states": ["Chhattisgarh", "Jharkhand", "Odisha", "Maharashtra"]},
            {"threat": "insurgent groups",
             "states": ["Manipur", "Nagaland", "Assam"]},
            {"threat": "cross-border infiltration",
             "states": ["Punjab", "Tripura", "West Bengal"]},
            {"threat": "drone-based smuggling of arms and narcotics",
             "states": ["Punjab", "Rajasthan"]},
            {"threat": "narcotics trafficking networks",
             "states": ["Punjab", "Manipur", "Mizoram"]},
        ],
        "hazard": [
            {"hazard": "cyclones", "states": ["Odisha", "Andhra Pradesh",
                                              "Tamil Nadu", "West Bengal",
                                              "Gujarat"]},
            {"hazard": "flash floods", "states": ["Himachal Pradesh",
                                                  "Uttarakhand", "Sikkim",
                                                  "Assam"]},
            {"hazard": "landslides", "states": ["Himachal Pradesh",
                                                "Uttarakhand", "Kerala",
                                                "Sikkim", "Meghalaya"]},
            {"hazard": "heatwaves", "states": ["Rajasthan", "Uttar Pradesh",
                                               "Bihar", "Telangana",
                                               "Madhya Pradesh"]},
            {"hazard": "earthquakes", "states": ["Uttarakhand", "Assam",
                                                 "Manipur", "Gujarat",
                                                 "Himachal Pradesh"]},
            {"hazard": "urban floods", "states": ["Maharashtra", "Tamil Nadu",
                                                  "Karnataka", "Telangana"]},
            {"hazard": "cloudbursts", "states": ["Himachal Pradesh",
                                                 "Uttarakhand"]},
            {"hazard": "droughts", "states": ["Maharashtra", "Karnataka",
                                              "Rajasthan", "Jharkhand"]},
        ],
        "hot_city": ["Jaipur", "Jodhpur", "Lucknow", "Varanasi", "Patna",
                     "Nagpur", "Hyderabad", "Bhubaneswar", "Bhopal", "Raipur"],
    },
    "closers": [
        "Policy makers said the issue would be taken up at the next meeting "
        "of the inter-ministerial group.",
        "The full report is expected to be released in {month}.",
        "Analysts said sustained public investment would be needed to see "
        "lasting results.",
    ],
    "subtopics": [
        {   # economy
            "stories": [
                ("The Reserve Bank of India kept the repo rate unchanged at "
                 "its policy review, noting that retail inflation had eased "
                 "to {pct_small} per cent.",
                 ["RBI holds repo rate as inflation eases to {pct_small} per "
                  "cent",
                  "Monetary policy: RBI keeps rates steady"]),
                ("Gross GST collections rose {pct} per cent year-on-year in "
                 "{month}, driven by strong domestic consumption and better "
                 "tax compliance.",
                 ["GST collections rise {pct} per cent in {month}",
                  "Tax buoyancy: GST mop-up climbs in {month}"]),
                ("Bank credit to the {sector} sector grew by {pct} per cent in "
                 "the last quarter, according to data released by the central "
                 "bank.",
                 ["Credit flow to {sector} sector picks up",
                  "{sector} loans grow {pct} per cent, RBI data show"]),
                ("The Finance Ministry said the Union government remains on "
                 "track to meet its fiscal deficit target despite higher "
                 "capital expenditure.",
                 ["Fiscal deficit target within reach, says Finance Ministry",
                  "Capex push will not derail fiscal deficit goal: Centre"]),
            ],
            "bodies": [
                "Economists expect GDP growth of around {gdp} per cent this "
                "year, supported by public investment and rural demand.",
                "The monetary policy committee flagged food prices and global "
                "commodity trends as key risks to the inflation outlook.",
                "Industry bodies have sought easier access to credit, lower "
                "compliance costs and faster tax refunds.",
                "Analysts say a narrower current account deficit and stable "
                "foreign exchange reserves have supported the rupee.",
                "The government has stepped up infrastructure spending to "
                "crowd in private investment and create jobs.",
            ],
        },
        {   # agriculture
            "stories": [
                ("The Centre has raised the minimum support price for {crop} "
                 "by Rs {msp} per quintal, a move aimed at improving farm "
                 "incomes.",
                 ["Centre raises MSP for {crop} by Rs {msp} a quintal",
                  "{crop} farmers get higher MSP ahead of sowing"]),
                ("Farmers growing {crop} in {state} are switching to drip and "
                 "sprinkler irrigation as groundwater levels decline and "
                 "power costs rise.",
                 ["{state} {crop} farmers turn to micro-irrigation",
                  "Falling groundwater pushes {state} towards drip "
                  "irrigation"]),
                ("Government agencies have procured over {lakh} lakh tonnes of "
                 "{crop} from farmers in {state} this season.",
                 ["{crop} procurement in {state} crosses {lakh} lakh tonnes",
                  "Record {crop} procurement in {state}"]),
                ("A network of farmer producer organisations in {state} is "
                 "helping {crop} growers negotiate better prices and cut input "
                 "costs.",
                 ["Farmer producer organisations help {state} {crop} growers",
                  "FPOs give {crop} farmers in {state} better bargaining "
                  "power"]),
            ],
            "bodies": [
                "Agricultural economists say crop diversification, soil health "
                "cards and better storage can reduce distress among small "
                "farmers.",
                "The crop insurance scheme has been extended to more "
                "districts, though farmers complain of delays in settling "
                "claims.",
                "Experts argue that investment in cold chains and food "
                "processing would reduce post-harvest losses.",
                "The agriculture department is promoting natural farming and "
                "balanced use of fertilisers to protect soil fertility.",
                "Electronic trading platforms have helped some farmers sell "
                "produce beyond their local mandis.",
            ],
        },
        {   # environment and ecology
            "stories": [
                ("The latest wildlife census in {state} has recorded a rise in "
                 "the population of the {species}, crediting habitat "
                 "protection and anti-poaching patrols.",
                 ["{species} numbers rise in {state}, census shows",
                  "Conservation gains for the {species} in {state}"],
                 ["Conservationists warn that habitat fragmentation and "
                  "human-wildlife conflict remain serious threats.",
                  "Local communities are being involved in conservation "
                  "through eco-development committees and forest rights."]),
                ("Air quality in {city} slipped into the 'poor' category this "
                 "week, prompting authorities to restrict construction and "
                 "check vehicular emissions.",
                 ["Air pollution in {city} prompts emergency measures",
                  "{city} air quality slips to 'poor'"],
                 ["The city's clean air action plan targets road dust, "
                  "vehicle exhaust and emissions from industries.",
                  "Doctors advised children and the elderly to limit outdoor "
                  "activity until pollution levels fall."]),
                ("A wetland near {city} has been designated a Ramsar site, "
                 "recognising its importance for migratory birds and "
                 "biodiversity.",
                 ["Wetland near {city} gets Ramsar tag",
                  "{state} adds a Ramsar site for migratory birds"],
                 ["The wetland supports fisheries, recharges groundwater and "
                  "shelters several threatened bird species.",
                  "The forest department plans to curb encroachment and "
                  "sewage inflow into the wetland."]),
                ("India added nearly {gw} gigawatts of solar and wind capacity "
                 "last year, moving closer to its renewable energy and climate "
                 "targets.",
                 ["India adds {gw} GW of renewable energy capacity",
                  "Solar and wind push: {gw} GW added in a year"],
                 ["Grid storage and new transmission lines will be needed to "
                  "absorb the growing share of clean power."]),
            ],
            "bodies": [
                "Environmental groups have called for stricter enforcement of "
                "pollution control and forest conservation laws.",
                "Climate change is expected to add to the pressure on "
                "ecosystems and biodiversity, scientists warn.",
                "Scientists say cutting carbon emissions and phasing down coal "
                "will be key to meeting India's climate commitments.",
                "An environmental impact assessment will be required before "
                "new projects are cleared in ecologically sensitive areas.",
            ],
        },
        {   # science and technology
            "stories": [
                ("The Indian Space Research Organisation successfully launched "
                 "{mission} from Sriharikota, placing it in the intended "
                 "orbit.",
                 ["ISRO successfully launches {mission}",
                  "Lift-off from Sriharikota: ISRO places {mission} in "
                  "orbit"]),
                ("The Department of Science and Technology has unveiled a "
                 "national roadmap for {tech}, with an outlay of Rs {crore} "
                 "crore over {n_years} years.",
                 ["India unveils Rs {crore} crore roadmap for {tech}",
                  "National mission on {tech} gets Rs {crore} crore"]),
                ("Researchers at a national institute in {city} have reported "
                 "a breakthrough in {tech} that could cut costs for Indian "
                 "industry.",
                 ["Scientists in {city} report breakthrough in {tech}",
                  "{city} lab advances indigenous {tech} research"]),
            ],
            "bodies": [
                "Scientists say the technology will strengthen India's "
                "self-reliance and reduce dependence on imports.",
                "Indigenous instruments and components developed by Indian "
                "engineers were used in the project.",
                "Start-ups and academic labs will be funded to translate "
                "research into commercial applications.",
                "Experts noted that spending on research and development "
                "remains at about {rd} per cent of GDP and needs to rise.",
                "The programme will also train young scientists and engineers "
                "in advanced research facilities.",
            ],
        },
        {   # internal security
            "stories": [
                ("Security forces in {state} have intensified operations "
                 "against {threat}, setting up {n_small} new camps in remote "
                 "areas over the past year.",
                 ["Security forces step up operations in {state}",
                  "{state} tightens security with {n_small} new camps"],
                 ["Officials said better roads, mobile connectivity and "
                  "development work are part of the security strategy in "
                  "remote areas.",
                  "Police said intelligence-led operations had led to a "
                  "number of arrests and seizures this year."]),
                ("The Union Home Ministry reviewed border infrastructure, "
                 "coastal surveillance and intelligence sharing at a meeting "
                 "with the central armed police forces.",
                 ["Centre reviews border infrastructure and coastal security",
                  "Home Ministry meeting focuses on border management"],
                 ["Border guarding forces are being equipped with "
                  "surveillance technology to curb infiltration and "
                  "smuggling."]),
                ("The national cyber security agency reported a {pct} per cent "
                 "rise in attacks targeting power grids, banks and other "
                 "critical infrastructure.",
                 ["Cyber attacks on critical infrastructure up {pct} per cent",
                  "Cyber security agency flags threat to power grids"],
                 ["The government plans to strengthen the cyber security "
                  "framework and train personnel to respond to threats."]),
                ("Investigators in {city} have uncovered a money laundering "
                 "network that allegedly routed funds to militant groups "
                 "through shell companies.",
                 ["Agencies bust terror funding network in {city}",
                  "Money laundering racket linked to militants unearthed"]),
            ],
            "bodies": [
                "Experts stressed the need for better coordination between "
                "central agencies and state police on internal security.",
                "The use of drones, encrypted apps and cryptocurrency has "
                "created new challenges for security agencies.",
                "Intelligence sharing between agencies has been identified as "
                "a priority for national security.",
            ],
        },
        {   # disaster management
            "stories": [
                ("The {state} disaster management authority has put district "
                 "administrations on alert and reviewed preparedness for "
                 "{hazard}.",
                 ["{state} readies for {hazard}",
                  "{state} reviews disaster preparedness for {hazard}"]),
                ("The National Disaster Management Authority has issued fresh "
                 "guidelines on preparedness and risk reduction for {hazard}.",
                 ["NDMA issues guidelines on {hazard} preparedness",
                  "New disaster risk reduction norms for {hazard}"]),
                ("A review of how {state} handled {hazard} last year found "
                 "that early preparation and community drills helped reduce "
                 "losses.",
                 ["Preparation cut losses from {hazard} in {state}",
                  "Lessons from {state}'s response to {hazard}"]),
                ("{hot_city} has expanded its heat action plan, opening "
                 "cooling shelters and changing working hours for outdoor "
                 "labourers.",
                 ["Heat action plan in {hot_city} expanded",
                  "{hot_city} opens cooling shelters under heat action plan"],
                 ["Hospitals have set aside beds for heatstroke patients and "
                  "public water points have been added across the city."]),
            ],
            "bodies": [
                "Officials said the focus has shifted from relief after a "
                "disaster to preparedness, mitigation and resilient "
                "infrastructure.",
                "Experts recommend hazard mapping, stricter building codes and "
                "regular mock drills in vulnerable districts.",
                "The Sendai Framework for Disaster Risk Reduction guides "
                "India's approach to reducing disaster losses.",
                "Community volunteers have been trained in first aid, "
                "evacuation and the management of relief camps.",
                "The state has set up a disaster response fund and plans to "
                "strengthen its emergency operations centre.",
            ],
        },
    ],
}

# ----------------------------- GS4 -----------------------------------------
CLASSES["GS4"] = {
    "slots": {
        "thinker": ["Mahatma Gandhi", "B. R. Ambedkar", "Swami Vivekananda",
                    "Kautilya", "Aristotle", "Immanuel Kant", "John Rawls",
                    "Rabindranath Tagore", "Confucius", "Thiruvalluvar"],
        "virtue": ["integrity", "empathy", "compassion", "honesty",
                   "impartiality", "moral courage", "humility",
                   "accountability", "objectivity", "tolerance"],
        "role": ["district collector", "municipal commissioner",
                 "police superintendent", "block development officer",
                 "tax officer", "public health officer",
                 "procurement officer", "sub-divisional magistrate"],
    },
    "closers": [
        "The piece ends by asking readers what they would have done in the "
        "same situation.",
        "Such questions of ethics, integrity and aptitude lie at the heart of "
        "public service.",
        "The writer concludes that character, more than cleverness, defines a "
        "good public servant.",
    ],
    "subtopics": [
        {   # integrity and probity of civil servants
            "stories": [
                ("A {role} in {state} has been praised for refusing a bribe "
                 "offered by a contractor and reporting the matter to "
                 "superiors.",
                 ["{state} {role} who refused a bribe becomes a symbol of "
                  "integrity",
                  "Integrity in action: a {role} says no to a bribe"],
                 ["Colleagues said the officer had faced pressure and veiled "
                  "threats but refused to compromise."]),
                ("A {role} posted in {city} faced a moral dilemma when a close "
                 "relative applied for a contract under the officer's "
                 "supervision.",
                 ["When duty meets conscience: a {role}'s dilemma",
                  "Conflict of interest: a test of ethics for a {role}"],
                 ["The officer chose transparency over personal loyalty, "
                  "declaring the relationship and stepping aside from the "
                  "decision."]),
                ("The case of a {role} who recused from a tender to avoid a "
                 "conflict of interest has revived debate on probity in "
                 "public life.",
                 ["A {role}'s recusal revives debate on probity",
                  "Probity in public life: lessons from a {role}"]),
            ],
            "bodies": [
                "Ethicists say integrity means acting rightly even when no one "
                "is watching and the personal costs are high.",
                "Former civil servants argue that honesty must be backed by "
                "institutional support so that upright officers are not "
                "isolated.",
                "The episode shows how conscience and a commitment to the "
                "public interest can guide choices in grey areas.",
                "Such cases are often discussed as examples of ethical "
                "decision making in public administration.",
            ],
        },
        {   # ethics in public administration
            "stories": [
                ("An essay on ethics in public administration argues that a "
                 "code of conduct alone cannot ensure probity without a "
                 "culture of accountability.",
                 ["Why a code of ethics for public servants matters",
                  "Probity in administration needs more than rules"]),
                ("A retired {role} writes that whistleblowers who expose "
                 "wrongdoing deserve legal protection and moral support.",
                 ["Whistleblowers and the ethics of accountability",
                  "A former {role} on protecting those who speak up"]),
                ("A national seminar in {city} on ethics in governance "
                 "discussed how values such as {virtue} and impartiality can "
                 "be nurtured among public servants.",
                 ["Seminar in {city} on nurturing {virtue} in public service",
                  "Values in administration: {virtue} under discussion"]),
            ],
            "bodies": [
                "A code of conduct lists rules, while a code of ethics sets "
                "out the values behind them.",
                "Transparency, answerability and the public interest should "
                "guide every administrative decision.",
                "Moral courage is needed to speak truth to "
                "power and resist undue pressure.",
                "The Nolan principles of selflessness, integrity, objectivity, "
                "accountability, openness, honesty and leadership were cited "
                "as a model.",
                "Ethics training should begin early "
                "and be reinforced throughout a civil servant's career.",
            ],
        },
        {   # moral thinkers
            "stories": [
                ("A lecture in {city} explored what the moral philosophy of "
                 "{thinker} can teach administrators about {virtue} and "
                 "service.",
                 ["What {thinker} can teach today's public servants",
                  "Lessons in {virtue} from {thinker}"]),
                ("In a reflective column, a former civil servant returns to "
                 "{thinker} to ask what ethical leadership means today.",
                 ["Revisiting {thinker} on ethical leadership",
                  "{thinker} and the conscience of the administrator"]),
                ("The teachings of {thinker} on duty, conscience and {virtue} "
                 "remain relevant for those in public service, a new book "
                 "argues.",
                 ["New book revisits {thinker}'s ideas on {virtue}",
                  "{thinker}, duty and {virtue}: a fresh reading"]),
            ],
            "bodies": [
                "Means matter as much as ends, and ethical conduct cannot be "
                "reduced to following orders.",
                "The idea of the common good, it is argued, obliges officials "
                "to serve the weakest citizen first.",
                "Ethical thinkers across traditions place character and virtue "
                "at the heart of public life.",
                "A distinction is drawn between personal morality and the "
                "values expected of a public servant.",
                "Readers are invited to reflect on how attitude, values and "
                "conscience shape everyday decisions.",
            ],
        },
        {   # emotional intelligence, attitude, empathy
            "stories": [
                ("A {role} in {city} who spends evenings listening to the "
                 "grievances of elderly citizens has become an example of "
                 "empathy in public service.",
                 ["A {role} shows how compassion can change public service",
                  "Empathy in administration: a {role} in {city} leads the "
                  "way"],
                 ["Colleagues said the officer's humility and patience helped "
                  "build trust with communities that had long felt "
                  "ignored."]),
                ("Trainers at a civil services academy say emotional "
                 "intelligence helps officers handle conflict, stress and "
                 "public anger with fairness.",
                 ["Why emotional intelligence matters for civil servants",
                  "Attitude, aptitude and the making of a good officer"]),
                ("A study of civil servants in {state} found that officers "
                 "with higher emotional intelligence were rated better at "
                 "resolving disputes with {virtue}.",
                 ["Emotional intelligence makes better officers, {state} "
                  "study finds",
                  "{state} study links empathy to better administration"]),
            ],
            "bodies": [
                "Empathy and compassion allow officials to see policies "
                "through the eyes of ordinary citizens.",
                "Self-awareness and self-regulation help officers remain calm "
                "and impartial under pressure.",
                "The example shows that attitude and values matter as much as "
                "rules in building public trust.",
                "Critics caution that emotional intelligence must be used to "
                "serve with honesty, never to manipulate.",
                "Humility and tolerance, it is said, build trust with "
                "communities that have long felt ignored.",
            ],
        },
    ],
}

# ----------------------------- none (not relevant) --------------------------
CLASSES["none"] = {
    "slots": {
        "mascot": ["Strikers", "Warriors", "Titans", "Chargers", "Panthers",
                   "Royals", "Blasters", "Rhinos", "Falcons", "Tuskers"],
        "film": ["Neon Nights", "The Silent Harbour", "Paper Kites",
                 "Moonlight Circus", "The Broken Compass",
                 "Dance of the Fireflies", "Highway Nine", "Crimson Letters",
                 "The Last Ferry", "Saffron Skies", "Lost in Lanes",
                 "Velvet Thunder", "Echoes at Noon", "Mango Summer"],
        "area": ["the old town", "a residential colony", "the railway colony",
                 "a busy market lane", "a gated housing society"],
        "brand": ["Zentro", "Novix", "Pixora", "Lumio", "Kryon", "Aurix",
                  "Vexa", "Orbitel"],
        "model": ["Nova 12", "Edge 5 Pro", "Spark Neo", "Max 20", "Air 3",
                  "Flip Lite", "Pulse 9", "Zoom X"],
        "dish": ["paneer butter masala", "masala dosa", "vegetable biryani",
                 "mango lassi", "aloo paratha", "chocolate brownies",
                 "lemon rice", "rajma chawal", "banana bread",
                 "chole bhature", "coconut ladoo", "tomato soup"],
        "workout": ["Pilates", "indoor cycling", "hot yoga", "dance cardio",
                    "kettlebell training", "animal flow"],
    },
    "closers": [],
    "subtopics": [
        {   # cricket
            "stories": [
                ("{city} {mascot} beat {city2} {mascot2} by {margin} runs in a "
                 "league match on {weekday}, with opener {person} scoring a "
                 "quickfire {runs}.",
                 ["{city} {mascot} beat {city2} {mascot2} by {margin} runs",
                  "{person}'s {runs} powers {city} {mascot} to victory"]),
                ("Chasing {target}, {city} {mascot} lost early wickets but "
                 "recovered to win with {balls} balls to spare against {city2} "
                 "{mascot2}.",
                 ["{city} {mascot} chase down {target} with {balls} balls "
                  "left",
                  "Thriller as {city} {mascot} pull off tense chase"]),
                ("Fast bowler {person} took {wkts} wickets as {city} {mascot} "
                 "bowled out {city2} {mascot2} for {low} on {weekday}.",
                 ["{person} takes {wkts} as {city2} {mascot2} fold for {low}",
                  "{city} {mascot} bowlers run riot against {city2}"]),
            ],
            "bodies": [
                "The crowd at the stadium cheered every boundary as the home "
                "side moved up the points table.",
                "The captain praised the fielders and said the team would "
                "carry the momentum into the next fixture.",
                "Rain delayed the start by half an hour, but the full quota of "
                "overs was bowled.",
                "The visitors dropped two catches in the final overs, which "
                "proved costly.",
                "Commentator {person2} called it one of the most entertaining "
                "games of the season.",
            ],
        },
        {   # football
            "stories": [
                ("A stoppage-time header from striker {person} gave {city} "
                 "{mascot} a {goals}-1 win over {city2} {mascot2} on {weekday} "
                 "night.",
                 ["Late header hands {city} {mascot} a {goals}-1 win",
                  "{person} strikes late as {city} {mascot} edge {city2}"]),
                ("{city} {mascot} were held to a goalless draw at home by "
                 "{city2} {mascot2} despite dominating possession for most of "
                 "the match.",
                 ["{city} {mascot} held to goalless draw at home",
                  "Stalemate as {city2} {mascot2} frustrate {city} "
                  "{mascot}"]),
                ("Midfielder {person} scored twice as {city} {mascot} came "
                 "from behind to beat {city2} {mascot2} {goals}-1 in front of a "
                 "packed home crowd.",
                 ["{person} double lifts {city} {mascot}",
                  "{city} {mascot} fight back to beat {city2} {mascot2}"]),
            ],
            "bodies": [
                "The coach said his side created enough chances but needed to "
                "be more clinical in front of goal.",
                "The result lifts the team to {pos} place in the league table "
                "with {n_small} matches left.",
                "Fans packed the stands and celebrated long after the final "
                "whistle.",
                "Goalkeeper {person2} made three fine saves in the second half "
                "to keep the visitors in the game.",
            ],
        },
        {   # badminton / tennis
            "stories": [
                ("Top seed {person} beat {person2} in straight games to reach "
                 "the final of the {city} Open badminton tournament.",
                 ["{person} storms into {city} Open final",
                  "Top seed {person} cruises past {person2}"]),
                ("{person} saved three match points before winning a marathon "
                 "semi-final against {person2} at the {city} Open tennis "
                 "event.",
                 ["{person} saves match points to reach {city} Open final",
                  "Marathon semi-final goes the way of {person}"]),
            ],
            "bodies": [
                "The {age}-year-old said the win was the result of months of "
                "work on fitness and footwork.",
                "The final will be played on {weekday} evening in front of a "
                "sold-out crowd.",
                "Spectators gave both players a standing ovation after the "
                "long rallies of the deciding set.",
                "The eventual champion will take home a trophy and the "
                "winner's cheque.",
            ],
        },
        {   # celebrity gossip
            "stories": [
                ("Actor {person} was spotted at the {city} airport on "
                 "{weekday} wearing an oversized jacket and sunglasses, and the "
                 "photos went viral on social media.",
                 ["{person}'s airport look goes viral",
                  "Spotted: {person} in {city} in an oversized jacket"]),
                ("Film star {person} has announced a wedding with long-time "
                 "partner {person2}, with a private ceremony planned in "
                 "{city}.",
                 ["{person} and {person2} announce wedding date",
                  "Wedding bells for {person} and {person2}"],
                 ["The couple reportedly met on the sets of a music video a "
                  "few years ago.",
                  "A source close to the star said only family members and "
                  "close friends have been invited."]),
                ("Pop singer {person} posted a series of holiday photos from a "
                 "beach resort, leaving fans guessing about the next album.",
                 ["{person}'s beach holiday photos set fans talking",
                  "{person} teases new album with holiday snaps"]),
            ],
            "bodies": [
                "Fans flooded the comments with heart emojis and "
                "congratulatory messages.",
                "Entertainment portals were quick to share the pictures, which "
                "soon started trending.",
                "A representative for the star declined to comment further.",
                "The post received over {likes} lakh likes within hours.",
            ],
        },
        {   # film reviews
            "stories": [
                ("'{film}' stars {person} as a small-town musician who moves to "
                 "{city} to chase fame, and the film works best in its quieter "
                 "moments.",
                 ["'{film}' review: {person} shines in an uneven drama",
                  "'{film}' movie review: a musician's journey to {city}"]),
                ("Director {person2} packs '{film}' with chases, twists and "
                 "loud background music, but the thriller loses steam after "
                 "the interval.",
                 ["'{film}' review: a slick thriller that runs out of steam",
                  "'{film}' movie review: twists galore, little tension"]),
                ("'{film}' is a breezy romantic comedy that rests almost "
                 "entirely on the charm of its lead pair, {person} and "
                 "{person2}.",
                 ["'{film}' review: a feel-good romcom with a few laughs",
                  "'{film}' review: {person} and {person2} carry a light "
                  "comedy"]),
            ],
            "bodies": [
                "The songs are catchy, though one too many slows down the "
                "second half.",
                "The cinematography makes the most of rain-soaked streets and "
                "neon-lit markets.",
                "The supporting cast, especially the comic sidekick, gets the "
                "biggest laughs.",
                "At over two and a half hours, the film could have been "
                "trimmed by at least twenty minutes.",
            ],
            "closers": ["Rating: {stars} out of 5 stars."],
        },
        {   # local crime
            "stories": [
                ("Two men on a motorcycle snatched a gold chain from a woman on "
                 "a morning walk in {area} of {city} on {weekday}, police "
                 "said.",
                 ["Chain snatchers target morning walker in {city}",
                  "Woman loses gold chain to bike-borne snatchers in {city}"]),
                ("Police in {city} have arrested two youths for allegedly "
                 "stealing {n_small} motorcycles from parking lots over the "
                 "past month.",
                 ["Two held for motorcycle thefts in {city}",
                  "{n_small} stolen bikes recovered in {city}"]),
                ("Burglars broke into a locked house in {area} of {city} while "
                 "the family was away at a wedding and made off with jewellery "
                 "and cash worth Rs {lakh2} lakh.",
                 ["Burglars strike locked house in {city}",
                  "Jewellery worth Rs {lakh2} lakh stolen from {city} home"]),
            ],
            "bodies": [
                "CCTV footage from nearby shops helped investigators identify "
                "the suspects.",
                "A case has been registered at the local police station and a "
                "search is on for the accused.",
                "Residents have asked for more night patrols in the "
                "neighbourhood.",
                "Police said the accused may be linked to similar incidents in "
                "other parts of the city.",
            ],
        },
        {   # gadget launches
            "stories": [
                ("{brand} has launched the {model} smartphone in India with a "
                 "{mp}-megapixel main camera, a {mah} mAh battery and a price "
                 "starting at Rs {price}.",
                 ["{brand} {model} launched with {mp}MP camera",
                  "{brand} {model} price starts at Rs {price}"]),
                ("{brand} unveiled new wireless earbuds that promise up to "
                 "{hours} hours of playback and support fast charging.",
                 ["{brand} unveils earbuds with {hours}-hour battery life",
                  "New {brand} earbuds promise {hours} hours of music"]),
                ("The {brand} {model} laptop goes on sale this week with a "
                 "thin metal body, a bright display and a backlit keyboard.",
                 ["{brand} {model} laptop goes on sale",
                  "Thin and light: {brand} {model} laptop arrives"]),
            ],
            "bodies": [
                "The device will be available in three colours through online "
                "stores from next {weekday}.",
                "Early buyers get bank discounts and a free case with the "
                "purchase.",
                "The company is offering a one-year warranty and an extended "
                "plan for {n_yrs} years.",
                "The company claims the new chip is faster and more "
                "power-efficient than the previous model.",
                "Early reviewers praised the design but said the price could "
                "have been lower.",
            ],
        },
        {   # recipes
            "stories": [
                ("This {dish} takes about {mins} minutes to make and needs "
                 "only a few ingredients from your kitchen shelf.",
                 ["Recipe: a quick {dish} for busy weeknights",
                  "{dish} in {mins} minutes"]),
                ("For a crowd-pleasing {dish}, start by preparing all the "
                 "ingredients and heating a heavy-bottomed pan on a medium "
                 "flame.",
                 ["How to make {dish} at home",
                  "Weekend cooking: {dish} with a twist"]),
                ("Home cooks looking for a comforting weekend treat can try "
                 "this easy {dish} recipe shared by a chef from {city}.",
                 ["A {city} chef's easy {dish} recipe",
                  "Comfort food: {dish} made simple"]),
            ],
            "bodies": [
                "Adjust the sweetness or spice to suit your family's taste.",
                "Most of the ingredients are easy to find at a neighbourhood "
                "grocery store.",
                "The recipe can easily be doubled for a weekend get-together.",
                "Leftovers can be stored in an airtight container in the "
                "fridge for up to two days.",
            ],
        },
        {   # lifestyle: travel, fashion, fitness
            "stories": [
                ("Looking for a quick break? These weekend getaways within a "
                 "few hours' drive of {city} offer cafes, lakes and cosy "
                 "homestays.",
                 ["Weekend getaways from {city} for a quick break",
                  "Short trips from {city} for the long weekend"],
                 ["Book early, as homestays fill up quickly on long weekends.",
                  "Carry comfortable shoes and a light jacket for the cool "
                  "evenings."]),
                ("Linen shirts are back in fashion this summer, and stylists "
                 "in {city} say they pair well with denim, chinos and white "
                 "sneakers.",
                 ["How to style a linen shirt this summer",
                  "{city} stylists bet on linen this season"],
                 ["Stylists recommend neutral colours and loose fits for hot "
                  "and humid days.",
                  "Roll up the sleeves and add a canvas belt for a relaxed "
                  "look."]),
                ("{workout} has become the latest fitness craze, with gyms in "
                 "{city} reporting long waiting lists for classes.",
                 ["Why everyone in {city} is trying {workout}",
                  "Fitness trend: {workout} takes over {city} gyms"],
                 ["Trainers suggest starting slowly and staying well "
                  "hydrated.",
                  "Many studios offer a free trial class for beginners."]),
            ],
            "bodies": [
                "Social media influencers have helped popularise the trend "
                "among young people.",
                "Prices vary, so it pays to compare options before you "
                "decide.",
            ],
        },
    ],
}

# ---------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------

_SLOT_RE = re.compile(r"\{(\w+)\}")


def _bind_place(binding, rng, states=None):
    places = PLACES if states is None else [p for p in PLACES if p[1] in states]
    binding["city"], binding["state"] = rng.choice(places)


def _draw_slot(name, binding, class_slots, rng):
    """Draw a value for slot ``name`` (binding related slots together).

    A vocabulary entry may be a dict: all its keys are bound at once (a list
    value means "pick one"), and a "states" key restricts the place drawn for
    {city}/{state} to those states.
    """
    if name in class_slots and isinstance(class_slots[name][0], dict):
        entry = rng.choice(class_slots[name])
        for key, val in entry.items():
            if key == "states":
                assert "city" not in binding, "place already drawn"
                _bind_place(binding, rng, val)
            else:
                binding[key] = rng.choice(val) if isinstance(val, list) else val
        return
    if name in ("city", "state"):
        _bind_place(binding, rng)
        return
    if name == "city2":
        if "city" not in binding:
            _draw_slot("city", binding, class_slots, rng)
        others = [c for c, _ in PLACES if c != binding["city"]]
        binding["city2"] = rng.choice(others)
        return
    if name in ("person", "person2"):
        other = "person2" if name == "person" else "person"
        while True:
            cand = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            if binding.get(other) != cand:
                binding[name] = cand
                return
    if name == "mascot2":
        if "mascot" not in binding:
            binding["mascot"] = rng.choice(class_slots["mascot"])
        others = [m for m in class_slots["mascot"] if m != binding["mascot"]]
        binding["mascot2"] = rng.choice(others)
        return
    if name in class_slots:
        binding[name] = rng.choice(class_slots[name])
    elif name in SHARED_SLOTS:
        binding[name] = rng.choice(SHARED_SLOTS[name])
    elif name in NUMERIC_SLOTS:
        binding[name] = NUMERIC_SLOTS[name](rng)
    else:
        raise KeyError(f"unknown slot {{{name}}}")


def _aliases(class_slots):
    """Map each key of a dict-valued vocabulary entry to its parent slot."""
    out = {}
    for name, values in class_slots.items():
        if isinstance(values[0], dict):
            for entry in values:
                for key in entry:
                    if key != "states":
                        out[key] = name
    return out


def _fill(template, binding, class_slots, rng):
    def repl(m):
        name = m.group(1)
        if name not in binding:
            _draw_slot(name, binding, class_slots, rng)
        return binding[name]

    out = _SLOT_RE.sub(repl, template)
    # Sentence-initial capital (slot values such as "the Quad" start lower-case).
    if out and out[0].islower():
        out = out[0].upper() + out[1:]
    return out


def compose(label, rng):
    """Return (title, text) for one synthetic article of class ``label``."""
    spec = CLASSES[label]
    slots = spec["slots"]
    sub = rng.choice(spec["subtopics"])
    story = rng.choice(sub["stories"])
    lead, headlines = story[0], story[1]
    pool = list(sub["bodies"]) + (list(story[2]) if len(story) > 2 else [])
    binding = {}

    # 2-4 sentences: the lead, 1-3 body sentences, and maybe a closer.
    n_body = rng.choice([1, 2, 2, 3])
    bodies = rng.sample(pool, n_body)
    sentences = [lead] + bodies
    closers = sub.get("closers", spec["closers"])
    if closers and len(sentences) < 4 and rng.random() < 0.4:
        sentences.append(rng.choice(closers))
    headline = rng.choice(headlines)

    # Draw tied vocabulary (which may constrain the place) before anything else.
    aliases = _aliases(slots)
    for name in _SLOT_RE.findall(" ".join(sentences + [headline])):
        parent = aliases.get(name)
        if parent is not None and name not in binding:
            _draw_slot(parent, binding, slots, rng)

    text = " ".join(_fill(s, binding, slots, rng) for s in sentences)
    title = _fill(headline, binding, slots, rng)
    return title, text


def class_counts(n):
    counts = {lab: int(round(n * SHARES[lab])) for lab in LABELS if lab != "none"}
    counts["none"] = n - sum(counts.values())
    return {lab: counts[lab] for lab in LABELS}


def generate(prefix, n, seed, seen_titles, seen_texts):
    """Generate ``n`` rows; ``seen_*`` sets are updated so rows stay unique."""
    rng = random.Random(seed)
    labels = [lab for lab, c in class_counts(n).items() for _ in range(c)]
    rng.shuffle(labels)
    rows = []
    for i, label in enumerate(labels, start=1):
        for _attempt in range(1000):
            title, text = compose(label, rng)
            n_words = len(text.split())
            if not (MIN_WORDS <= n_words <= MAX_WORDS):
                continue
            if title in seen_titles or text in seen_texts:
                continue
            break
        else:  # pragma: no cover - vocabularies are large enough
            raise RuntimeError(f"could not compose a unique {label} row")
        seen_titles.add(title)
        seen_texts.add(text)
        rows.append({
            "id": f"{prefix}-{i:04d}",
            "title": title,
            "text": text,
            "relevant": "no" if label == "none" else "yes",
            "gs_paper": label,
        })
    return rows


def check_vocab():
    """Every state named in a tied vocabulary must have a place in PLACES."""
    known = {state for _, state in PLACES}
    for label, spec in CLASSES.items():
        for name, values in spec["slots"].items():
            for entry in values:
                if isinstance(entry, dict) and "states" in entry:
                    missing = set(entry["states"]) - known
                    assert not missing, (label, name, missing)


def validate(rows, n):
    assert len(rows) == n, (len(rows), n)
    for row in rows:
        assert list(row) == ["id", "title", "text", "relevant", "gs_paper"]
        assert all(isinstance(v, str) and v for v in row.values())
        assert row["gs_paper"] in LABELS
        assert (row["relevant"] == "no") == (row["gs_paper"] == "none")
        assert "{" not in row["title"] + row["text"]
        assert MIN_WORDS <= len(row["text"].split()) <= MAX_WORDS
        assert (row["title"] + row["text"]).isascii()
    assert len({r["id"] for r in rows}) == n


def write_jsonl(path, rows):
    data = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
    path.write_bytes(data.encode("utf-8"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outdir", type=Path, default=Path(__file__).resolve().parent,
                    help="directory to write golden.jsonl and silver.jsonl "
                         "(default: next to this script)")
    args = ap.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)

    check_vocab()
    seen_titles, seen_texts = set(), set()
    golden = generate("golden", GOLDEN_N, GOLDEN_SEED, seen_titles, seen_texts)
    silver = generate("silver", SILVER_N, SILVER_SEED, seen_titles, seen_texts)

    for name, rows, n in (("golden", golden, GOLDEN_N), ("silver", silver, SILVER_N)):
        validate(rows, n)
        path = args.outdir / f"{name}.jsonl"
        digest = write_jsonl(path, rows)
        counts = Counter(r["gs_paper"] for r in rows)
        words = [len(r["text"].split()) for r in rows]
        print(f"{path.name}: {len(rows)} rows, {path.stat().st_size} bytes, "
              f"sha256 {digest[:16]}")
        print("  " + "  ".join(f"{lab}={counts[lab]}" for lab in LABELS)
              + f"  (relevant yes={len(rows) - counts['none']} no={counts['none']})")
        print(f"  words per text: min {min(words)}, max {max(words)}, "
              f"mean {sum(words) / len(words):.1f}")


if __name__ == "__main__":
    main()
