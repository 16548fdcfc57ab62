"""What the real checkpoints' chat templates render on the conversations of
tests/test_vlm_chat.py::test_our_templates_render_what_the_real_ones_render, produced by rendering each real
template (tests/vlm_families.py TEMPLATE_SOURCES; fetched into a scratch folder, not kept here) through the
family's processor; Llama 3.2 Vision with date_string="26 Jul 2024". Keys: (conversation, add_generation_prompt),
the prompt form being the first user turn alone."""

RENDERED = {
    'llava': {
        ('multi-turn', False): (
            'USER: <image>\n'
            'What colour is the square? ASSISTANT: It is red. USER: And the circle? ASSISTANT: It is blue. '
        ),
        ('multi-turn', True): 'USER: <image>\nWhat colour is the square? ASSISTANT:',
        ('multi-image', False): (
            'USER: <image>\n<image>\n'
            'Which one is red? ASSISTANT: The first. USER: And the other? ASSISTANT: It is green. '
        ),
        ('multi-image', True): 'USER: <image>\n<image>\nWhich one is red? ASSISTANT:',
        ('text-only', False): (
            'USER: What colour is the square? ASSISTANT: It is red. USER: And the circle? ASSISTANT: It is bl'
            'ue. '
        ),
        ('text-only', True): 'USER: What colour is the square? ASSISTANT:',
    },
    'llava_next': {
        ('multi-turn', False): (
            'USER: <image>\n'
            'What colour is the square? ASSISTANT: It is red. USER: And the circle? ASSISTANT: It is blue. '
        ),
        ('multi-turn', True): 'USER: <image>\nWhat colour is the square? ASSISTANT:',
        ('multi-image', False): (
            'USER: <image>\n<image>\n'
            'Which one is red? ASSISTANT: The first. USER: And the other? ASSISTANT: It is green. '
        ),
        ('multi-image', True): 'USER: <image>\n<image>\nWhich one is red? ASSISTANT:',
        ('text-only', False): (
            'USER: What colour is the square? ASSISTANT: It is red. USER: And the circle? ASSISTANT: It is bl'
            'ue. '
        ),
        ('text-only', True): 'USER: What colour is the square? ASSISTANT:',
    },
    'llava_next_mistral': {
        ('multi-turn', False): (
            '[INST] <image>\nWhat colour is the square? [/INST] It is red.</s> [INST] And the circle? [/INST] '
            'It is blue.</s> '
        ),
        ('multi-turn', True): '[INST] <image>\nWhat colour is the square? [/INST]',
        ('multi-image', False): (
            '[INST] <image>\n<image>\n'
            'Which one is red? [/INST] The first.</s> [INST] And the other? [/INST] It is green.</s> '
        ),
        ('multi-image', True): '[INST] <image>\n<image>\nWhich one is red? [/INST]',
        ('text-only', False): (
            '[INST] What colour is the square? [/INST] It is red.</s> [INST] And the circle? [/INST] It is bl'
            'ue.</s> '
        ),
        ('text-only', True): '[INST] What colour is the square? [/INST]',
    },
    'llava_next_mistral_bs': {
        ('multi-turn', False): (
            '[INST] <image>\nWhat colour is the square? [/INST] It is red.<\\s> [INST] And the circle? [/INST] '
            'It is blue.<\\s> '
        ),
        ('multi-turn', True): '[INST] <image>\nWhat colour is the square? [/INST]',
        ('multi-image', False): (
            '[INST] <image>\n<image>\n'
            'Which one is red? [/INST] The first.<\\s> [INST] And the other? [/INST] It is green.<\\s> '
        ),
        ('multi-image', True): '[INST] <image>\n<image>\nWhich one is red? [/INST]',
        ('text-only', False): (
            '[INST] What colour is the square? [/INST] It is red.<\\s> [INST] And the circle? [/INST] It is bl'
            'ue.<\\s> '
        ),
        ('text-only', True): '[INST] What colour is the square? [/INST]',
    },
    'llava_onevision': {
        ('multi-turn', False): (
            '<|im_start|>user <image>\nWhat colour is the square?<|im_end|><|im_start|>assistant \n'
            'It is red.<|im_end|><|im_start|>user \nAnd the circle?<|im_end|><|im_start|>assistant \n'
            'It is blue.<|im_end|>'
        ),
        ('multi-turn', True): '<|im_start|>user <image>\nWhat colour is the square?<|im_end|><|im_start|>assistant\n',
        ('multi-image', False): (
            '<|im_start|>user <image><image>\nWhich one is red?<|im_end|><|im_start|>assistant \n'
            'The first.<|im_end|><|im_start|>user \nAnd the other?<|im_end|><|im_start|>assistant \n'
            'It is green.<|im_end|>'
        ),
        ('multi-image', True): '<|im_start|>user <image><image>\nWhich one is red?<|im_end|><|im_start|>assistant\n',
        ('text-only', False): (
            '<|im_start|>user \nWhat colour is the square?<|im_end|><|im_start|>assistant \n'
            'It is red.<|im_end|><|im_start|>user \nAnd the circle?<|im_end|><|im_start|>assistant \n'
            'It is blue.<|im_end|>'
        ),
        ('text-only', True): '<|im_start|>user \nWhat colour is the square?<|im_end|><|im_start|>assistant\n',
    },
    'qwen2_vl': {
        ('multi-turn', False): (
            '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
            '<|vision_start|><|image_pad|><|vision_end|>What colour is the square?<|im_end|>\n'
            '<|im_start|>assistant\nIt is red.<|im_end|>\n<|im_start|>user\nAnd the circle?<|im_end|>\n'
            '<|im_start|>assistant\nIt is blue.<|im_end|>\n'
        ),
        ('multi-turn', True): (
            '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
            '<|vision_start|><|image_pad|><|vision_end|>What colour is the square?<|im_end|>\n'
            '<|im_start|>assistant\n'
        ),
        ('multi-image', False): (
            '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|ima'
            'ge_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Which one is red?<|im_end|>\n'
            '<|im_start|>assistant\nThe first.<|im_end|>\n<|im_start|>user\nAnd the other?<|im_end|>\n'
            '<|im_start|>assistant\nIt is green.<|im_end|>\n'
        ),
        ('multi-image', True): (
            '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|ima'
            'ge_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Which one is red?<|im_end|>\n'
            '<|im_start|>assistant\n'
        ),
        ('text-only', False): (
            '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
            'What colour is the square?<|im_end|>\n<|im_start|>assistant\nIt is red.<|im_end|>\n'
            '<|im_start|>user\nAnd the circle?<|im_end|>\n<|im_start|>assistant\nIt is blue.<|im_end|>\n'
        ),
        ('text-only', True): (
            '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
            'What colour is the square?<|im_end|>\n<|im_start|>assistant\n'
        ),
    },
    'idefics3': {
        ('multi-turn', False): (
            '<|begin_of_text|>User:<image>What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\nUser: And the circle?<end_of_utterance>\n'
            'Assistant: It is blue.<end_of_utterance>\n'
        ),
        ('multi-turn', True): '<|begin_of_text|>User:<image>What colour is the square?<end_of_utterance>\nAssistant:',
        ('multi-image', False): (
            '<|begin_of_text|>User:<image><image>Which one is red?<end_of_utterance>\n'
            'Assistant: The first.<end_of_utterance>\nUser: And the other?<end_of_utterance>\n'
            'Assistant: It is green.<end_of_utterance>\n'
        ),
        ('multi-image', True): '<|begin_of_text|>User:<image><image>Which one is red?<end_of_utterance>\nAssistant:',
        ('text-only', False): (
            '<|begin_of_text|>User: What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\nUser: And the circle?<end_of_utterance>\n'
            'Assistant: It is blue.<end_of_utterance>\n'
        ),
        ('text-only', True): '<|begin_of_text|>User: What colour is the square?<end_of_utterance>\nAssistant:',
    },
    'smolvlm': {
        ('multi-turn', False): (
            '<|im_start|>User:<image>What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\nUser: And the circle?<end_of_utterance>\n'
            'Assistant: It is blue.<end_of_utterance>\n'
        ),
        ('multi-turn', True): '<|im_start|>User:<image>What colour is the square?<end_of_utterance>\nAssistant:',
        ('multi-image', False): (
            '<|im_start|>User:<image><image>Which one is red?<end_of_utterance>\n'
            'Assistant: The first.<end_of_utterance>\nUser: And the other?<end_of_utterance>\n'
            'Assistant: It is green.<end_of_utterance>\n'
        ),
        ('multi-image', True): '<|im_start|>User:<image><image>Which one is red?<end_of_utterance>\nAssistant:',
        ('text-only', False): (
            '<|im_start|>User: What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\nUser: And the circle?<end_of_utterance>\n'
            'Assistant: It is blue.<end_of_utterance>\n'
        ),
        ('text-only', True): '<|im_start|>User: What colour is the square?<end_of_utterance>\nAssistant:',
    },
    'gemma3': {
        ('multi-turn', False): (
            '<bos><start_of_turn>user\n<start_of_image>What colour is the square?<end_of_turn>\n'
            '<start_of_turn>model\nIt is red.<end_of_turn>\n<start_of_turn>user\nAnd the circle?<end_of_turn>\n'
            '<start_of_turn>model\nIt is blue.<end_of_turn>\n'
        ),
        ('multi-turn', True): (
            '<bos><start_of_turn>user\n<start_of_image>What colour is the square?<end_of_turn>\n'
            '<start_of_turn>model\n'
        ),
        ('multi-image', False): (
            '<bos><start_of_turn>user\n<start_of_image><start_of_image>Which one is red?<end_of_turn>\n'
            '<start_of_turn>model\nThe first.<end_of_turn>\n<start_of_turn>user\nAnd the other?<end_of_turn>\n'
            '<start_of_turn>model\nIt is green.<end_of_turn>\n'
        ),
        ('multi-image', True): (
            '<bos><start_of_turn>user\n<start_of_image><start_of_image>Which one is red?<end_of_turn>\n'
            '<start_of_turn>model\n'
        ),
        ('text-only', False): (
            '<bos><start_of_turn>user\nWhat colour is the square?<end_of_turn>\n<start_of_turn>model\n'
            'It is red.<end_of_turn>\n<start_of_turn>user\nAnd the circle?<end_of_turn>\n<start_of_turn>model\n'
            'It is blue.<end_of_turn>\n'
        ),
        ('text-only', True): (
            '<bos><start_of_turn>user\nWhat colour is the square?<end_of_turn>\n<start_of_turn>model\n'
        ),
    },
    'mllama': {
        ('multi-turn', False): (
            '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n'
            '<|image|>What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
            'It is red.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
            'And the circle?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is blue.<|eot_id|>'
        ),
        ('multi-turn', True): (
            '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n'
            '<|image|>What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
        ),
        ('multi-image', False): (
            '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n'
            '<|image|><|image|>Which one is red?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
            'The first.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
            'And the other?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is green.<|eot_id|>'
        ),
        ('multi-image', True): (
            '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n'
            '<|image|><|image|>Which one is red?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
        ),
        ('text-only', False): (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n'
            'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n'
            '<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
            'What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
            'It is red.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
            'And the circle?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is blue.<|eot_id|>'
        ),
        ('text-only', True): (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n'
            'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n'
            '<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
            'What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
        ),
    },
}

# The conversations with a system turn first (tests/test_vlm_chat.py SYSTEM_CONVERSATIONS), each real template given
# the system message in the form the recipe gives it (data/vlm_chat.py system_as_the_template_takes_it: a list of
# content items; a string for Llama 3.2 Vision, whose template writes a list's repr); Llama 3.2 Vision's later
# revision (the earlier one raises "Prompting with images is incompatible with system messages." on the first).
RENDERED_WITH_SYSTEM = {
    'llava': {
        ('system', False): (
            'You are a careful assistant. USER: <image>\n'
            'What colour is the square? ASSISTANT: It is red. USER: And the circle? ASSISTANT: It is blue. '
        ),
        ('system', True): (
            'You are a careful assistant. USER: <image>\n'
            'What colour is the square? ASSISTANT:'
        ),
        ('system text-only', False): (
            'You are a careful assistant. USER: What colour is the square? ASSISTANT: It is red. '
        ),
        ('system text-only', True): 'You are a careful assistant. USER: What colour is the square? ASSISTANT:',
    },
    'llava_next': {
        ('system', False): (
            'You are a careful assistant. USER: <image>\n'
            'What colour is the square? ASSISTANT: It is red. USER: And the circle? ASSISTANT: It is blue. '
        ),
        ('system', True): (
            'You are a careful assistant. USER: <image>\n'
            'What colour is the square? ASSISTANT:'
        ),
        ('system text-only', False): (
            'You are a careful assistant. USER: What colour is the square? ASSISTANT: It is red. '
        ),
        ('system text-only', True): 'You are a careful assistant. USER: What colour is the square? ASSISTANT:',
    },
    'llava_next_mistral': {
        ('system', False): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] <image>\n'
            'What colour is the square? [/INST] It is red.</s> [INST] And the circle? [/INST] It is blue.</s> '
        ),
        ('system', True): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] <image>\n'
            'What colour is the square? [/INST]'
        ),
        ('system text-only', False): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] What colour is the square? [/INST] It is red.</s> '
        ),
        ('system text-only', True): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] What colour is the square? [/INST]'
        ),
    },
    'llava_next_mistral_bs': {
        ('system', False): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] <image>\n'
            'What colour is the square? [/INST] It is red.<\\s> [INST] And the circle? [/INST] It is blue.<\\s> '
        ),
        ('system', True): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] <image>\n'
            'What colour is the square? [/INST]'
        ),
        ('system text-only', False): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] What colour is the square? [/INST] It is red.<\\s> '
        ),
        ('system text-only', True): (
            '<<SYS>>\n'
            'You are a careful assistant.\n'
            '<</SYS>>\n'
            '\n'
            '[INST] What colour is the square? [/INST]'
        ),
    },
    'llava_onevision': {
        ('system', False): (
            '<|im_start|>system \n'
            'You are a careful assistant.<|im_end|><|im_start|>user <image>\n'
            'What colour is the square?<|im_end|><|im_start|>assistant \n'
            'It is red.<|im_end|><|im_start|>user \n'
            'And the circle?<|im_end|><|im_start|>assistant \n'
            'It is blue.<|im_end|>'
        ),
        ('system', True): (
            '<|im_start|>system \n'
            'You are a careful assistant.<|im_end|><|im_start|>user <image>\n'
            'What colour is the square?<|im_end|><|im_start|>assistant\n'
        ),
        ('system text-only', False): (
            '<|im_start|>system \n'
            'You are a careful assistant.<|im_end|><|im_start|>user \n'
            'What colour is the square?<|im_end|><|im_start|>assistant \n'
            'It is red.<|im_end|>'
        ),
        ('system text-only', True): (
            '<|im_start|>system \n'
            'You are a careful assistant.<|im_end|><|im_start|>user \n'
            'What colour is the square?<|im_end|><|im_start|>assistant\n'
        ),
    },
    'qwen2_vl': {
        ('system', False): (
            '<|im_start|>system\n'
            'You are a careful assistant.<|im_end|>\n'
            '<|im_start|>user\n'
            '<|vision_start|><|image_pad|><|vision_end|>What colour is the square?<|im_end|>\n'
            '<|im_start|>assistant\n'
            'It is red.<|im_end|>\n'
            '<|im_start|>user\n'
            'And the circle?<|im_end|>\n'
            '<|im_start|>assistant\n'
            'It is blue.<|im_end|>\n'
        ),
        ('system', True): (
            '<|im_start|>system\n'
            'You are a careful assistant.<|im_end|>\n'
            '<|im_start|>user\n'
            '<|vision_start|><|image_pad|><|vision_end|>What colour is the square?<|im_end|>\n'
            '<|im_start|>assistant\n'
        ),
        ('system text-only', False): (
            '<|im_start|>system\n'
            'You are a careful assistant.<|im_end|>\n'
            '<|im_start|>user\n'
            'What colour is the square?<|im_end|>\n'
            '<|im_start|>assistant\n'
            'It is red.<|im_end|>\n'
        ),
        ('system text-only', True): (
            '<|im_start|>system\n'
            'You are a careful assistant.<|im_end|>\n'
            '<|im_start|>user\n'
            'What colour is the square?<|im_end|>\n'
            '<|im_start|>assistant\n'
        ),
    },
    'idefics3': {
        ('system', False): (
            '<|begin_of_text|>System: You are a careful assistant.<end_of_utterance>\n'
            'User:<image>What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\n'
            'User: And the circle?<end_of_utterance>\n'
            'Assistant: It is blue.<end_of_utterance>\n'
        ),
        ('system', True): (
            '<|begin_of_text|>System: You are a careful assistant.<end_of_utterance>\n'
            'User:<image>What colour is the square?<end_of_utterance>\n'
            'Assistant:'
        ),
        ('system text-only', False): (
            '<|begin_of_text|>System: You are a careful assistant.<end_of_utterance>\n'
            'User: What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\n'
        ),
        ('system text-only', True): (
            '<|begin_of_text|>System: You are a careful assistant.<end_of_utterance>\n'
            'User: What colour is the square?<end_of_utterance>\n'
            'Assistant:'
        ),
    },
    'smolvlm': {
        ('system', False): (
            '<|im_start|>System: You are a careful assistant.<end_of_utterance>\n'
            'User:<image>What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\n'
            'User: And the circle?<end_of_utterance>\n'
            'Assistant: It is blue.<end_of_utterance>\n'
        ),
        ('system', True): (
            '<|im_start|>System: You are a careful assistant.<end_of_utterance>\n'
            'User:<image>What colour is the square?<end_of_utterance>\n'
            'Assistant:'
        ),
        ('system text-only', False): (
            '<|im_start|>System: You are a careful assistant.<end_of_utterance>\n'
            'User: What colour is the square?<end_of_utterance>\n'
            'Assistant: It is red.<end_of_utterance>\n'
        ),
        ('system text-only', True): (
            '<|im_start|>System: You are a careful assistant.<end_of_utterance>\n'
            'User: What colour is the square?<end_of_utterance>\n'
            'Assistant:'
        ),
    },
    'gemma3': {
        ('system', False): (
            '<bos><start_of_turn>user\n'
            'You are a careful assistant.\n'
            '\n'
            '<start_of_image>What colour is the square?<end_of_turn>\n'
            '<start_of_turn>model\n'
            'It is red.<end_of_turn>\n'
            '<start_of_turn>user\n'
            'And the circle?<end_of_turn>\n'
            '<start_of_turn>model\n'
            'It is blue.<end_of_turn>\n'
        ),
        ('system', True): (
            '<bos><start_of_turn>user\n'
            'You are a careful assistant.\n'
            '\n'
            '<start_of_image>What colour is the square?<end_of_turn>\n'
            '<start_of_turn>model\n'
        ),
        ('system text-only', False): (
            '<bos><start_of_turn>user\n'
            'You are a careful assistant.\n'
            '\n'
            'What colour is the square?<end_of_turn>\n'
            '<start_of_turn>model\n'
            'It is red.<end_of_turn>\n'
        ),
        ('system text-only', True): (
            '<bos><start_of_turn>user\n'
            'You are a careful assistant.\n'
            '\n'
            'What colour is the square?<end_of_turn>\n'
            '<start_of_turn>model\n'
        ),
    },
    'mllama': {
        ('system', False): (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            'You are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            '<|image|>What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            'It is red.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'And the circle?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            'It is blue.<|eot_id|>'
        ),
        ('system', True): (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            'You are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            '<|image|>What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
        ),
        ('system text-only', False): (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            'You are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            'It is red.<|eot_id|>'
        ),
        ('system text-only', True): (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            'You are a careful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'What colour is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
        ),
    },
}
for _family, _renderings in RENDERED_WITH_SYSTEM.items():
    RENDERED[_family].update(_renderings)

# Mistral-Small-3.1-24B-Instruct-2503's template (transformers tests/models/mistral3/test_processing_mistral3.py)
# on every conversation above, rendered on MISTRAL3_DATE: its default system prompt holds the day's date
# (strftime_now, not date_string), which tests/test_vlm_chat.py puts in place of today's
MISTRAL3_DATE = '2026-12-05'
RENDERED['mistral3'] = {
    ('multi-turn', False): (
        '<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a Fr'
        'ench startup headquartered in Paris.\n'
        'Your knowledge base was last updated on 2023-10-01. The current date is 2026-12-05.\n'
        '\n'
        "When you're not sure about some information, you say that you don't have the information and don't "
        'make up anything.\n'
        "If the user's question is not clear, ambiguous, or does not provide enough context for you to accur"
        'ately answer the question, you do not try to answer it right away and you rather ask the user to cl'
        'arify their request (e.g. "What are some good restaurants around me?" => "Where are you?" or "When '
        'is the next flight to Tokyo" => "Where do you travel from?")[/SYSTEM_PROMPT][INST][IMG]What colour '
        'is the square?[/INST]It is red.</s>[INST]And the circle?[/INST]It is blue.</s>'
    ),
    ('multi-turn', True): (
        '<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a Fr'
        'ench startup headquartered in Paris.\n'
        'Your knowledge base was last updated on 2023-10-01. The current date is 2026-12-05.\n'
        '\n'
        "When you're not sure about some information, you say that you don't have the information and don't "
        'make up anything.\n'
        "If the user's question is not clear, ambiguous, or does not provide enough context for you to accur"
        'ately answer the question, you do not try to answer it right away and you rather ask the user to cl'
        'arify their request (e.g. "What are some good restaurants around me?" => "Where are you?" or "When '
        'is the next flight to Tokyo" => "Where do you travel from?")[/SYSTEM_PROMPT][INST][IMG]What colour '
        'is the square?[/INST]'
    ),
    ('multi-image', False): (
        '<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a Fr'
        'ench startup headquartered in Paris.\n'
        'Your knowledge base was last updated on 2023-10-01. The current date is 2026-12-05.\n'
        '\n'
        "When you're not sure about some information, you say that you don't have the information and don't "
        'make up anything.\n'
        "If the user's question is not clear, ambiguous, or does not provide enough context for you to accur"
        'ately answer the question, you do not try to answer it right away and you rather ask the user to cl'
        'arify their request (e.g. "What are some good restaurants around me?" => "Where are you?" or "When '
        'is the next flight to Tokyo" => "Where do you travel from?")[/SYSTEM_PROMPT][INST][IMG][IMG]Which o'
        'ne is red?[/INST]The first.</s>[INST]And the other?[/INST]It is green.</s>'
    ),
    ('multi-image', True): (
        '<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a Fr'
        'ench startup headquartered in Paris.\n'
        'Your knowledge base was last updated on 2023-10-01. The current date is 2026-12-05.\n'
        '\n'
        "When you're not sure about some information, you say that you don't have the information and don't "
        'make up anything.\n'
        "If the user's question is not clear, ambiguous, or does not provide enough context for you to accur"
        'ately answer the question, you do not try to answer it right away and you rather ask the user to cl'
        'arify their request (e.g. "What are some good restaurants around me?" => "Where are you?" or "When '
        'is the next flight to Tokyo" => "Where do you travel from?")[/SYSTEM_PROMPT][INST][IMG][IMG]Which o'
        'ne is red?[/INST]'
    ),
    ('text-only', False): (
        '<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a Fr'
        'ench startup headquartered in Paris.\n'
        'Your knowledge base was last updated on 2023-10-01. The current date is 2026-12-05.\n'
        '\n'
        "When you're not sure about some information, you say that you don't have the information and don't "
        'make up anything.\n'
        "If the user's question is not clear, ambiguous, or does not provide enough context for you to accur"
        'ately answer the question, you do not try to answer it right away and you rather ask the user to cl'
        'arify their request (e.g. "What are some good restaurants around me?" => "Where are you?" or "When '
        'is the next flight to Tokyo" => "Where do you travel from?")[/SYSTEM_PROMPT][INST]What colour is th'
        'e square?[/INST]It is red.</s>[INST]And the circle?[/INST]It is blue.</s>'
    ),
    ('text-only', True): (
        '<s>[SYSTEM_PROMPT]You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a Fr'
        'ench startup headquartered in Paris.\n'
        'Your knowledge base was last updated on 2023-10-01. The current date is 2026-12-05.\n'
        '\n'
        "When you're not sure about some information, you say that you don't have the information and don't "
        'make up anything.\n'
        "If the user's question is not clear, ambiguous, or does not provide enough context for you to accur"
        'ately answer the question, you do not try to answer it right away and you rather ask the user to cl'
        'arify their request (e.g. "What are some good restaurants around me?" => "Where are you?" or "When '
        'is the next flight to Tokyo" => "Where do you travel from?")[/SYSTEM_PROMPT][INST]What colour is th'
        'e square?[/INST]'
    ),
    ('system', False): (
        '<s>[SYSTEM_PROMPT]You are a careful assistant.[/SYSTEM_PROMPT][INST][IMG]What colour is the square?'
        '[/INST]It is red.</s>[INST]And the circle?[/INST]It is blue.</s>'
    ),
    ('system', True): (
        '<s>[SYSTEM_PROMPT]You are a careful assistant.[/SYSTEM_PROMPT][INST][IMG]What colour is the square?'
        '[/INST]'
    ),
    ('system text-only', False): (
        '<s>[SYSTEM_PROMPT]You are a careful assistant.[/SYSTEM_PROMPT][INST]What colour is the square?[/INS'
        'T]It is red.</s>'
    ),
    ('system text-only', True): (
        '<s>[SYSTEM_PROMPT]You are a careful assistant.[/SYSTEM_PROMPT][INST]What colour is the square?[/INS'
        'T]'
    ),
}

# pixtral-12b's template as transformers' convert_pixtral_weights_to_hf.py writes it: a system message goes into the
# last user turn only, so a conversation that ends with an answer renders without it, and a prompt after a system
# message given as content items raises ("[INST]" + a list): no prompt renderings with a system turn
RENDERED['pixtral'] = {
    ('multi-turn', False): (
        '<s>[INST][IMG]What colour is the square?[/INST]It is red.</s>[INST]And the circle?[/INST]It is blue'
        '.</s>'
    ),
    ('multi-turn', True): '<s>[INST][IMG]What colour is the square?[/INST]',
    ('multi-image', False): (
        '<s>[INST][IMG][IMG]Which one is red?[/INST]The first.</s>[INST]And the other?[/INST]It is green.</s'
        '>'
    ),
    ('multi-image', True): '<s>[INST][IMG][IMG]Which one is red?[/INST]',
    ('text-only', False): (
        '<s>[INST]What colour is the square?[/INST]It is red.</s>[INST]And the circle?[/INST]It is blue.</s>'
    ),
    ('text-only', True): '<s>[INST]What colour is the square?[/INST]',
    ('system', False): (
        '<s>[INST][IMG]What colour is the square?[/INST]It is red.</s>[INST]And the circle?[/INST]It is blue'
        '.</s>'
    ),
    ('system text-only', False): '<s>[INST]What colour is the square?[/INST]It is red.</s>',
}
