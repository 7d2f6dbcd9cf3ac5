"""Names and codes of the HUME-VB release (ExVo 2022) and the A-VB 2022 labels.

One place for the facts every reader and writer must agree on; see docs/hume_vb.md.
"""

SAMPLE_RATE = 16_000  # Hz; every clip the project hands out is 16 kHz mono.

# Canonical order of the ten ExVo emotion intensities (data_info.csv headers).
EMOTIONS = (
    "Awe", "Excitement", "Amusement", "Awkwardness", "Fear",
    "Horror", "Distress", "Triumph", "Sadness", "Surprise",
)

# Country codes 0-3 as some copies of data_info.csv store them.
COUNTRIES = ("China", "South Africa", "United States", "Venezuela")

SPLITS = ("Train", "Val", "Test")

# A-VB 2022 label files under labels/.
AVB_TWO = ("Valence", "Arousal")
# A-VB Culture: 40 columns <Country>_<Emotion>, as labels/culture_info.csv orders them: for each country in the
# A-VB order the nine emotions other than Surprise (schema.EMOTIONS order), then the four <Country>_Surprise columns.
# One copy of the release misspells 'SouthAfrica_Sadness': readers match header names without spaces.
AVB_CULTURE_COUNTRIES = ("China", "United States", "South Africa", "Venezuela")
AVB_CULTURE = (tuple(f"{c}_{e}" for c in AVB_CULTURE_COUNTRIES for e in EMOTIONS if e != "Surprise")
               + tuple(f"{c}_Surprise" for c in AVB_CULTURE_COUNTRIES))
# A-VB Type: the 8 Voc_Type classes in the organisers' (alphabetical) encoding, so class i is their class i.
AVB_TYPES = ("Cry", "Gasp", "Groan", "Grunt", "Laugh", "Other", "Pant", "Scream")
