"""Benchmark evaluation: metrics (pure functions over strings), readers of the official formats, server
submission writers, and one CLI (`python -m eval score|submit|tasks|generate`). No torch import here:
generation, which needs a model, lives in its own module and is loaded only by `python -m eval generate`.

Scoring predictions held in memory (ids are strings; every scorer returns fractions in [0, 1], captions x100):

    vqa.vqa_score(prediction, answers, prediction_processing)       VQAv2 / VizWiz, one question
    vqa.textvqa_score(prediction, answers)                            TextVQA, one question
    choice.gqa_scores(predictions, {qid: GQAQuestion})                GQA eval.py (balanced questions)
    choice.vlt5_label_accuracy(predictions, {qid: {answer: score}})   VL-T5 GQA / label-dict files
    choice.pope_scores(predictions, labels, categories)               POPE per category
    choice.scienceqa_scores(predictions, problems)                    ScienceQA
    choice.nlvr2_scores(predictions, {identifier: bool}, lenient)     NLVR2 accuracy, consistency
    choice.multiple_choice_scores(predictions, {qid: index}, n_choices, groups, lenient)   TVQA, How2QA
    mmbench.mmbench_scores(predictions, {index: MMBenchQuestion})     MMBench circular accuracy
    captions.coco_caption_scores(predictions, references)             COCO captions (references in GT order)
    captions.value_caption_scores(predictions, references)            TVC / YC2C, VALUE protocol
    captions.per_description_caption_scores(predictions, references)  TVC / YC2C, NVlabs/DoRA protocol

and `tasks.score(task, predictions_path, ground_truth_path, TaskOptions(...))` for files.
"""
