"""Metric rules checked on hand-computed cases (the official scorers' behaviour, including its odd corners)."""
import pytest

from eval import choice, mmbench, vqa


# ------------------------------------------------------------------------------------------------ VQA
@pytest.mark.parametrize("text,expected", [
    ("3,000", "3000"),          # digit,digit anywhere: every punctuation mark is deleted
    ("t-shirt", "t shirt"),     # a mark not touching a space becomes a space
    ("Two dogs", "2 dogs"),     # number words to digits, lowercase
    ("a.m.", "am"),             # every "." not followed by a digit goes
    ("1.5", "1.5"),             # ... a "." before a digit stays
    ("the cat", "cat"),         # articles dropped
    ("dont know", "don't know"),  # contractions restored
    ("yes, sir", "yes sir"),    # ", " touches a space: deleted
    ("none", "0"),
    ("An apple!", "apple"),
])
def test_official_normalisation(text, expected):
    assert vqa.normalize_answer(text) == expected


def test_period_strip_stops_after_32_substitutions_like_the_official_call():
    # sub("", text, re.UNICODE) passes re.UNICODE (32) as the count
    text = ". " * 40
    assert vqa.process_punctuation(text).count(".") == 8


@pytest.mark.parametrize("matches,score", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_mean(matches, score):
    answers = ["red"] * matches + ["blue", "green", "pink", "grey", "white", "black", "brown", "gold", "teal",
                                   "navy"][: 10 - matches]
    assert vqa.vqa_score("red", answers) == pytest.approx(score)


def test_duplicates_count_as_entries_not_distinct_strings():
    # 2 x "two" and 8 different answers: "2" matches two entries after normalisation -> 0.6
    answers = ["two", "two", "a", "b", "c", "d", "e", "f", "g", "h"]
    assert vqa.vqa_score("2", answers) == pytest.approx(0.6)


def test_no_normalisation_when_all_ten_answers_agree():
    assert vqa.vqa_score("Yes", ["yes"] * 10) == 0.0
    assert vqa.vqa_score("yes.", ["yes"] * 10) == 0.0
    assert vqa.vqa_score("yes", ["yes"] * 10) == 1.0
    # LLaVA / lmms-eval process the prediction first, which rescues these
    assert vqa.vqa_score("Yes", ["yes"] * 10, prediction_processing="evalai") == 1.0
    assert vqa.vqa_score("yes.", ["yes"] * 10, prediction_processing="evalai") == 1.0


def test_normalisation_when_answers_differ():
    answers = ["Yes"] * 5 + ["yes."] * 3 + ["no"] * 2
    assert vqa.vqa_score("YES!", answers) == 1.0  # all of Yes / yes. / YES! normalise to "yes"
    assert vqa.vqa_score(" yes\n", ["yes"] * 10) == 1.0  # whitespace is cleaned in any case


def test_evalai_processor():
    assert vqa.evalai_normalize("It's a Dog, I think?") == "it 's dog i think"
    assert vqa.evalai_normalize("Two.") == "2"


def test_textvqa_score_normalises_both_sides():
    answers = ["Coca Cola"] * 3 + ["coca-cola"] * 2 + ["pepsi"] * 5
    # "coca cola" matches the 3 "Coca Cola" entries after processing; "coca-cola" becomes "coca cola" too
    assert vqa.textvqa_score("COCA COLA", answers) == pytest.approx(1.0)
    assert vqa.textvqa_score("pepsi", answers) == pytest.approx(1.0)
    assert vqa.textvqa_score("sprite", answers) == 0.0


# ------------------------------------------------------------------------------------------------ others
def test_gqa_exact_match():
    assert choice.exact_match_accuracy({"1": "Yes.", "2": "left", "3": "the cup"},
                                       {"1": "yes", "2": "right", "3": "cup"}) == pytest.approx(1 / 3)


def test_nlvr2_accuracy_and_consistency():
    labels = {"test1-0-1-0": True, "test1-0-1-1": False, "test1-0-2-0": True, "test1-1-0-0": False}
    preds = {"test1-0-1-0": "true", "test1-0-1-1": "false", "test1-0-2-0": "false", "test1-1-0-0": "False"}
    scores = choice.nlvr2_scores(preds, labels)
    assert scores["accuracy"] == pytest.approx(3 / 4)
    # groups blank the third field: test1-0--0 = {0-1-0, 0-2-0}, test1-0--1 = {0-1-1}, test1-1--0 = {1-0-0}
    assert scores["consistency"] == pytest.approx(2 / 3)
    assert choice.nlvr2_group("train-10171-0-0") == "train-10171--0"


@pytest.mark.parametrize("text,answer", [
    ("Yes, there is a dog.", "yes"), ("No, there is not.", "no"), ("There is not a cat", "no"),
    ("Yes. No.", "yes"), ("NO", "yes"),  # the rule is case-sensitive: 'NO' is not a no-word
    ("no", "no"),
])
def test_pope_answer_rule(text, answer):
    assert choice.pope_answer(text) == answer


def test_pope_metrics_per_category():
    labels = {"1": "yes", "2": "no", "3": "yes", "4": "no", "5": "yes"}
    cats = {"1": "random", "2": "random", "3": "random", "4": "random", "5": "popular"}
    preds = {"1": "Yes", "2": "Yes", "3": "No", "4": "No", "5": "Yes"}
    s = choice.pope_scores(preds, labels, cats)
    r = s["random"]
    # TP=1 (1), FP=1 (2), FN=1 (3), TN=1 (4)
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert s["popular"]["accuracy"] == 1.0 and s["popular"]["f1"] == 1.0


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("B. The cat", "B"), ("The answer is C.", "C"), ("b", None), ("B.", None),
    ("The answer is A. The answer is B.", None), ("Maybe D", None),
])
def test_scienceqa_letter_rules(text, letter):
    assert choice.scienceqa_letter(text) == letter


def test_scienceqa_scores_img_subset():
    problems = {"1": {"choices": ["x", "y"], "answer": 1, "image": "image.png"},
                "2": {"choices": ["x", "y", "z"], "answer": 0, "image": None},
                "3": {"choices": ["x", "y"], "answer": 0, "image": "image.png"}}
    preds = {"1": "B", "2": "A", "3": "C"}  # C is out of range for two choices: wrong
    s = choice.scienceqa_scores(preds, problems)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["img_accuracy"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("text,letter", [
    ("A", "A"), ("(B) a cat", "B"), ("The answer is C.", "C"), ("I think it is a dog", "B"),
    ("A or B", None), ("B", "B"),
])
def test_choice_letter_extraction(text, letter):
    choices = {"A": "cat", "B": "dog", "C": "bird"}
    assert mmbench.infer_choice(text, choices) == letter


@pytest.mark.parametrize("text,letter", [
    ("Z", "Z"), ("Cannot determine the answer", "Z"),      # VLMEvalKit's refusals: never right
    ("the answer is a", "A"),                                # 'answer is X' is case-insensitive
    ("A B C D E F", None),                                   # several letters, no option text
    ("C is wrong, it is one of the others for sure", None),  # the one letter is not among the last four words
])
def test_vlmevalkit_option_rules(text, letter):
    assert mmbench.infer_choice(text, {"A": "cat", "B": "dog", "C": "bird"}) == letter


def test_option_text_counts_only_in_answers_at_most_twice_as_long_as_all_options():
    choices = {"A": "cat", "B": "dog"}  # 2 * 6 characters
    assert mmbench.infer_choice("it is a dog.", choices) == "B"
    assert mmbench.infer_choice("it is surely a dog", choices) is None  # 18 > 12


def test_gqa_scores_only_balanced_questions():
    questions = {"1": choice.GQAQuestion("yes", True, "verify", "attr"),
                 "2": choice.GQAQuestion("left", False, "query", "rel"),
                 "3": choice.GQAQuestion("cup", True, "query", "obj")}
    s = choice.gqa_scores({"1": "Yes.", "2": "left", "3": "a cup"}, questions)
    assert (s["accuracy"], s["count"], s["binary"], s["open"]) == (0.5, 2, 1.0, 0.0)
    assert s["per_structural_type"] == {"query": 0.0, "verify": 1.0}
    assert choice.vlt5_label_accuracy({"1": "yes", "2": "no"}, {"1": {"yes": 1.0}, "2": {}}) == 0.5  # empty label


def test_api_failure_marker_skips_the_letter_rule_only():
    choices = {"A": "a black and white cat", "B": "a small brown dog", "C": "a bird"}
    assert mmbench.infer_choice("It is A small brown dog", choices) == "A"  # the letter rule wins
    assert mmbench.infer_choice("Failed to obtain answer via API. A small brown dog", choices) == "B"


def test_mmbench_generated_copies_shift_right_and_every_copy_must_be_right():
    base = {"7": mmbench.MMBenchQuestion(7, "B", {"A": "cat", "B": "dog", "C": "bird"}, "animals"),
            "8": mmbench.MMBenchQuestion(8, "A", {"A": "red", "B": "blue"}, "colours")}
    questions = mmbench.circular_copies(base)
    assert sorted(questions) == ["1000007", "1000008", "2000007", "7", "8"]
    # copy k shows texts[-k:] + texts[:-k]: copy 1 of question 7 is (bird, cat, dog), copy 2 (dog, bird, cat)
    assert list(questions["1000007"].choices.values()) == ["bird", "cat", "dog"]
    assert questions["1000007"].answer == "C" and questions["2000007"].answer == "A"
    preds = {"7": "B", "1000007": "C", "2000007": "A", "8": "A", "1000008": "A"}  # 8 fails its copy
    s = mmbench.mmbench_scores(preds, questions)
    assert s["single_pass_accuracy"] == 1.0 and s["circular_accuracy"] == 0.5
    assert s["per_category"] == {"animals": 1.0, "colours": 0.0}


@pytest.mark.parametrize("text,official,lenient", [
    ("a3", 3, 3), ("A3", None, 3), ("3", None, 3), (" a0 ", None, 0), ("a3.", None, 3), ("a03", None, 3),
    ("a7", None, None), ("dog", None, None), ("", None, None)])
def test_choice_index_official_and_lenient(text, official, lenient):
    assert choice.choice_index(text, 5) == official
    assert choice.choice_index(text, 5, lenient=True) == lenient


@pytest.mark.parametrize("text,official,lenient", [
    ("true", True, True), ("False", False, False), ("TRUE", True, True), ("True.", None, True),
    (" true", None, True), ("yes", None, True), ("1", None, True), ("0", None, False), ("maybe", None, None)])
def test_nlvr2_answer_official_and_lenient(text, official, lenient):
    assert choice.nlvr2_answer(text) is official
    assert choice.nlvr2_answer(text, lenient=True) is lenient
