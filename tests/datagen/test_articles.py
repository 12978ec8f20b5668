import pytest

from services.datagen.text import indefinite_article, with_article


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        # plain vowel-letter rule
        ("orange hoodie", "an orange hoodie"),
        ("ivory vase", "an ivory vase"),
        ("umbrella", "an umbrella"),
        ("oil painting", "an oil painting"),
        ("hat", "a hat"),
        ("yellow mug", "a yellow mug"),
        # vowel letters with a consonant sound
        ("useful gadget", "a useful gadget"),
        ("European-style chair", "a European-style chair"),
        ("eucalyptus sprig", "a eucalyptus sprig"),
        ("unisex cap", "a unisex cap"),
        ("uniform", "a uniform"),
        ("unicorn plush", "a unicorn plush"),
        ("utilitarian backpack", "a utilitarian backpack"),
        ("one-piece swimsuit", "a one-piece swimsuit"),
        ("one-of-a-kind ring", "a one-of-a-kind ring"),
        # ... but not every "un"/"on" word
        ("uninspired design", "an uninspired design"),
        ("ultra-thin laptop", "an ultra-thin laptop"),
        ("onyx black ring", "an onyx black ring"),
        # silent h
        ("hourglass", "an hourglass"),
        ("honest review", "an honest review"),
        ("heirloom locket", "an heirloom locket"),
        # initialisms and capital letters are spelled out
        ("LED desk lamp", "an LED desk lamp"),
        ("HDMI cable", "an HDMI cable"),
        ("RC car", "an RC car"),
        ("MDF shelf", "an MDF shelf"),
        ("L-shaped sectional sofa", "an L-shaped sectional sofa"),
        ("A-line skirt", "an A-line skirt"),
        ("USB-C charger", "a USB-C charger"),
        ("VR headset", "a VR headset"),
        ("UFO graphic", "a UFO graphic"),
        ("Y2K-style phone case", "a Y2K-style phone case"),
        # all-caps words read as words
        ("NATO-style strap", "a NATO-style strap"),
        # numbers are read aloud
        ("18k gold ring", "an 18k gold ring"),
        ("14k gold ring", "a 14k gold ring"),
        ("8-piece set", "an 8-piece set"),
        ("11-inch laptop", "an 11-inch laptop"),
        ("110-piece puzzle", "a 110-piece puzzle"),
        ("4K monitor", "a 4K monitor"),
    ],
)
def test_article_follows_the_sound(phrase, expected):
    assert with_article(phrase) == expected


def test_article_looks_only_at_the_first_word():
    assert indefinite_article("hour-long") == "an"
    assert indefinite_article("  (orange) hoodie") == "an"


def test_article_needs_a_word():
    with pytest.raises(ValueError):
        indefinite_article(" - ")
