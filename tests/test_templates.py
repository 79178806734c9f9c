"""Response masks under the real chat templates of the model families, against hand-written renderings.

Each family gets a tiny tokenizer built with `tokenizers`: its control tokens are added as special
tokens (as the real tokenizers add them, Phi-3's absorbing the whitespace after them), and its
pre-tokenizer isolates every whitespace and punctuation character, so the edges of the hand-written
pieces below are token edges. Every expected rendering and mask is written by hand; none comes from
the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import load_rows
from poft_ds.data.tokenize import tokenize_rows
from poft_ds.tiny import ZEPHYR_TEMPLATE
from tests.conftest import base_spec, write_spec

# Chat templates as published in the models' tokenizer_config.json; where a copy was found it is verbatim.
# meta-llama/Meta-Llama-3-8B-Instruct, verbatim from TRL's trl/chat_templates/llama3.jinja.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct's template (Llama-3.3-70B-Instruct ships the same), verbatim from
# llama.cpp's models/templates: a system header with a knowledge cutoff and a date comes first.
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-7B-Instruct. Reproduced from public copies (chujiezheng/chat_templates' qwen2.5-instruct.jinja,
# which doubles the spaces inside tags, and code quoting the template with single spaces); rendering-equivalent.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-8B, verbatim from TRL's trl/chat_templates/qwen3.jinja.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# google/gemma-2-2b-it (the same in gemma-2-9b-it), verbatim from llama.cpp's models/templates.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-*-it, as quoted in public code (a transformers.js worker; TRL's gemma3_training.jinja is
# this template with generation markers added).
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# mistralai/Mistral-7B-Instruct-v0.2 as first published (also Mixtral-8x7B-Instruct-v0.1's), verbatim from
# llama.cpp's tests/test-chat-template.cpp.
MISTRAL_V02 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.3, verbatim from TRL's trl/chat_templates/mistral.jinja: the system message
# goes into the last message when that is a user turn, so a prefix renders differently from the whole.
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# microsoft/Phi-3-mini-4k-instruct, verbatim from TRL's trl/chat_templates/phi3.jinja (without the file's final
# newline, which the tokenizer_config.json value does not have): an eos_token closes a conversation.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/phi-4, verbatim from llama.cpp's tests/test-chat-template.cpp: a user turn opens the assistant's.
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|><|im_start|>assistant<|im_sep|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
)

# TRL's trl/chat_templates/deepseek_r1_distill_training.jinja, verbatim: DeepSeek-R1-Distill's template with
# {% generation %} markers. Its generation prompt pre-fills "<think>\n", so a prefix rendering is not a prefix
# of the conversation and the markers decide.
DEEPSEEK_R1_MARKED = r"""{#- Training variant of the DeepSeek-R1-Distill chat template (see deepseek_r1_distill.jinja for the original).
    Modifications vs the original:
    - Added {% generation %} / {% endgeneration %} around assistant message output to support
      assistant-only loss masking in SFT training.
    - Removed the '</think>' split on assistant content; always render the reasoning block. The original drops
      everything up to and including '</think>', which would silently remove the reasoning from the training target.
-#}
{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- generation %}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endgeneration %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{%- generation %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- endgeneration %}{%- else %}{%- generation %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endgeneration %}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"""

SYSTEM = {"role": "system", "content": "Be brief."}
# Contents that start and end with spaces and newlines (kept by some templates, trimmed by others), and a
# user turn that contains the later answer ("4"), which must not be mistaken for it.
TURNS = [
    {"role": "user", "content": " What is 1+1?\n"},
    {"role": "assistant", "content": "\n2 "},
    {"role": "user", "content": "And 2+2? Is it 4?"},
    {"role": "assistant", "content": " 4\n"},
]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PHI3_CONTROL = ["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


@dataclass
class Family:
    """A model family's template and tokenizer, a conversation, and its rendering written by hand.

    Attributes:
        pieces: The rendering as (text, trained?) pieces, in order.
        specials: Control tokens, added as special tokens.
        bos, eos: The tokenizer's BOS and EOS tokens.
        adds_bos: Whether the tokenizer itself puts BOS first (when the template does not write it).
        rstrip: Control tokens that absorb the whitespace after them (Phi-3's `rstrip`).
        added: Added tokens that are not special (Qwen3's `<think>`).
        prepends_bos: Whether the sample starts with the tokenizer's BOS, untrained, before the rendering
            (a template that writes BOS itself must not get a second one).
    """

    name: str
    template: str
    messages: list[dict[str, str]]
    pieces: list[tuple[str, bool]]
    specials: list[str]
    bos: str | None = None
    eos: str | None = None
    adds_bos: bool = False
    rstrip: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    prepends_bos: bool = False


FAMILIES = [
    Family(
        "llama-3",
        LLAMA3,
        [SYSTEM, *TURNS],
        [
            ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", False),
            ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            ("2<|eot_id|>", True),  # trimmed by the template
            ("<|start_header_id|>user<|end_header_id|>\n\nAnd 2+2? Is it 4?<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            ("4<|eot_id|>", True),
        ],
        LLAMA_SPECIALS,
        "<|begin_of_text|>",
        "<|eot_id|>",
        adds_bos=True,  # and the template writes it too: it must not be doubled
    ),
    Family(
        "llama-3.1",
        LLAMA31,
        [SYSTEM, *TURNS],
        [
            (
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>",
                False,
            ),
            ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            ("2<|eot_id|>", True),
            ("<|start_header_id|>user<|end_header_id|>\n\nAnd 2+2? Is it 4?<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            ("4<|eot_id|>", True),
        ],
        LLAMA_SPECIALS,
        "<|begin_of_text|>",
        "<|eot_id|>",
        adds_bos=True,
    ),
    Family(
        "qwen2.5",
        QWEN25,
        TURNS,
        [
            (
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
                False,
            ),
            ("<|im_start|>user\n What is 1+1?\n<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("\n2 <|im_end|>", True),
            ("\n<|im_start|>user\nAnd 2+2? Is it 4?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            (" 4\n<|im_end|>", True),
            ("\n", False),
        ],
        QWEN_SPECIALS,
        eos="<|im_end|>",
    ),
    Family(
        "qwen3",
        QWEN3,
        [SYSTEM, *TURNS],
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
            ("<|im_start|>user\n What is 1+1?\n<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("\n2 <|im_end|>", True),  # history: rendered plainly
            ("\n<|im_start|>user\nAnd 2+2? Is it 4?<|im_end|>\n", False),
            # The last turn gets an empty reasoning block the data does not have: template text, not trained.
            ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
            (" 4\n<|im_end|>", True),
            ("\n", False),
        ],
        QWEN_SPECIALS,
        eos="<|im_end|>",
        added=("<think>", "</think>"),
    ),
    Family(
        "qwen3-reasoning",
        QWEN3,
        [*TURNS[:3], {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n 4\n"}],
        [
            ("<|im_start|>user\n What is 1+1?\n<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("\n2 <|im_end|>", True),
            ("\n<|im_start|>user\nAnd 2+2? Is it 4?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            # Reasoning written the way the template writes it is the last turn's content, trained.
            ("<think>\nTwo and two.\n</think>\n\n 4\n<|im_end|>", True),
            ("\n", False),
        ],
        QWEN_SPECIALS,
        eos="<|im_end|>",
        added=("<think>", "</think>"),
    ),
    Family(
        "gemma-2",
        GEMMA2,
        TURNS,
        [
            ("<bos><start_of_turn>user\nWhat is 1+1?<end_of_turn>\n", False),
            ("<start_of_turn>model\n", False),
            ("2<end_of_turn>", True),
            ("\n<start_of_turn>user\nAnd 2+2? Is it 4?<end_of_turn>\n", False),
            ("<start_of_turn>model\n", False),
            ("4<end_of_turn>", True),
            ("\n", False),
        ],
        GEMMA_SPECIALS,
        "<bos>",
        "<eos>",
        adds_bos=True,
    ),
    Family(
        "gemma-3",
        GEMMA3,
        [SYSTEM, *TURNS],
        [
            ("<bos><start_of_turn>user\nBe brief.\n\nWhat is 1+1?<end_of_turn>\n", False),  # system folded in
            ("<start_of_turn>model\n", False),
            ("2<end_of_turn>", True),
            ("\n<start_of_turn>user\nAnd 2+2? Is it 4?<end_of_turn>\n", False),
            ("<start_of_turn>model\n", False),
            ("4<end_of_turn>", True),
            ("\n", False),
        ],
        GEMMA_SPECIALS,
        "<bos>",
        "<eos>",
        adds_bos=True,
    ),
    Family(
        "mistral-v0.3",
        MISTRAL_V03,
        [SYSTEM, *TURNS],
        [
            # The system message goes into the last user turn only when that turn ends the conversation.
            ("<s>[INST]  What is 1+1?\n[/INST] ", False),
            ("2</s>", True),
            ("[INST] And 2+2? Is it 4?[/INST] ", False),
            ("4</s>", True),
        ],
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "<s>",
        "</s>",
        adds_bos=True,
    ),
    Family(
        "phi-3",
        PHI3,
        [SYSTEM, *TURNS],
        [
            ("<|system|>\nBe brief.<|end|>\n", False),
            ("<|user|>\n What is 1+1?\n<|end|>\n", False),
            # The control token absorbs the newline that starts the answer: it stays untrained.
            ("<|assistant|>\n\n", False),
            ("2 <|end|>\n", True),
            ("<|user|>\nAnd 2+2? Is it 4?<|end|>\n", False),
            ("<|assistant|>\n ", False),
            ("4\n<|end|>\n", True),
            ("<|endoftext|>", False),  # closes the conversation, not the turn
        ],
        ["<unk>", "<s>", "</s>", "<|endoftext|>", *PHI3_CONTROL],
        "<s>",
        "<|endoftext|>",
        rstrip=tuple(PHI3_CONTROL),
    ),
    Family(
        "phi-4",
        PHI4,
        [SYSTEM, *TURNS],
        [
            ("<|im_start|>system<|im_sep|>Be brief.<|im_end|>", False),
            ("<|im_start|>user<|im_sep|> What is 1+1?\n<|im_end|><|im_start|>assistant<|im_sep|>", False),
            ("\n2 <|im_end|>", True),
            ("<|im_start|>user<|im_sep|>And 2+2? Is it 4?<|im_end|><|im_start|>assistant<|im_sep|>", False),
            (" 4\n<|im_end|>", True),
        ],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"],
        "<|endoftext|>",
        "<|im_end|>",
    ),
    Family(
        "zephyr",
        ZEPHYR_TEMPLATE,
        [SYSTEM, *TURNS],
        [
            ("<|system|>\nBe brief.</s>\n", False),
            ("<|user|>\n What is 1+1?\n</s>\n", False),
            ("<|assistant|>\n", False),
            ("\n2 </s>", True),
            ("\n<|user|>\nAnd 2+2? Is it 4?</s>\n", False),
            ("<|assistant|>\n", False),
            (" 4\n</s>", True),
            ("\n", False),
        ],
        ["<unk>", "<s>", "</s>"],  # zephyr's role tags are plain text in Mistral's vocabulary
        "<s>",
        "</s>",
        adds_bos=True,
        prepends_bos=True,
    ),
    Family(
        "generation-markers",
        DEEPSEEK_R1_MARKED,
        [SYSTEM, *TURNS],
        [
            ("<｜begin▁of▁sentence｜>Be brief.<｜User｜> What is 1+1?\n", False),
            # The template's markers decide, and they include the role tag.
            ("<｜Assistant｜>\n2 <｜end▁of▁sentence｜>", True),
            ("<｜User｜>And 2+2? Is it 4?", False),
            ("<｜Assistant｜> 4\n<｜end▁of▁sentence｜>", True),
        ],
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        adds_bos=True,
        added=("<think>", "</think>"),
    ),
]


def family_tokenizer(family: Family, folder: Path) -> PreTrainedTokenizerBase:
    """A tiny BPE tokenizer with the family's control tokens, saved and loaded the way models' are."""
    tok = Tokenizer(models.BPE())
    # Every whitespace and punctuation character is a pre-token of its own, so a piece edge is a token edge.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s|[^\w\s]"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, rstrip=t in family.rstrip, normalized=False, special=True) for t in family.specials]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text for text, _ in family.pieces], trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in family.added])
    if family.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", special_tokens=[(family.bos, tok.token_to_id(family.bos))]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos)
    hf.chat_template = family.template
    hf.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_masks_are_each_assistant_turns_rendered_content_and_end_of_turn(family: Family, tmp_path: Path) -> None:
    tok = family_tokenizer(family, tmp_path)
    rendered = tok.apply_chat_template(family.messages, tokenize=False)
    assert rendered == "".join(text for text, _ in family.pieces)
    ids, mask = ([tok.bos_token_id], [False]) if family.prepends_bos else ([], [])
    for text, trained in family.pieces:
        piece_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    sample, reason = ChatTokenizer(tok, max_length=4096)(family.messages)
    assert reason is None
    assert sample.input_ids == ids
    assert sample.response_mask == mask


def test_qwen3_row_whose_earlier_turn_has_reasoning_is_unusable_not_mis_masked(tmp_path: Path) -> None:
    """Qwen3 renders an earlier assistant turn without its reasoning.

    The conversation then holds only the turn's answer, which the data's author did not write
    without that reasoning; training it would teach the model to answer without thinking, and the
    reasoning cannot be trained since the rendering drops it. So the row is reported, naming the turn.
    """
    tok = family_tokenizer(next(f for f in FAMILIES if f.name == "qwen3"), tmp_path)
    messages = [TURNS[0], {"role": "assistant", "content": "<think>\nOne and one.\n</think>\n\n2"}, *TURNS[2:]]
    assert "One and one" not in tok.apply_chat_template(messages, tokenize=False)
    assert ChatTokenizer(tok, max_length=4096)(messages) == (None, "chat template rewrites assistant turn 1's content")


def test_mistral_instruct_masks_with_the_real_sentencepiece_tokenizer(
    mistral_tokenizer: PreTrainedTokenizerBase,
) -> None:
    text = mistral_tokenizer.apply_chat_template(TURNS, chat_template=MISTRAL_V02, tokenize=False)
    assert text == "<s>[INST]  What is 1+1?\n [/INST]\n2 </s>[INST] And 2+2? Is it 4? [/INST] 4\n</s>"
    sample, reason = ChatTokenizer(mistral_tokenizer, max_length=512, chat_template=MISTRAL_V02)(TURNS)
    assert reason is None
    tokens = mistral_tokenizer.convert_ids_to_tokens(sample.input_ids)
    # The template writes BOS; the tokenizer's add_bos_token must not add a second one.
    assert tokens[0] == "<s>" and tokens.count("<s>") == 1
    runs, run = [], []
    for i, (token, trained) in enumerate(zip(tokens, sample.response_mask)):
        if trained:
            run = run or [tokens[i - 1]]  # the token before the run, to check where it starts
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs.append(run)
    # Hand-written SentencePiece pieces: "\n2 " then </s>, " 4\n" then </s>, each right after "[/INST]".
    assert runs == [["]", "<0x0A>", "2", "▁", "</s>"], ["]", "▁", "4", "<0x0A>", "</s>"]]


def _write_rows(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


# Line 2: a user turn follows a user turn; line 3: a system turn; lines 1 and 4 are good.
MIXED = [TURNS, [TURNS[0], TURNS[2], TURNS[3]], [SYSTEM, *TURNS], TURNS[:2]]
ALTERNATE = "chat template refused the row: Conversation roles must alternate user/assistant/user/assistant/..."


def test_rows_a_template_refuses_are_reported_by_line_and_the_others_tokenized(
    tmp_path: Path, mistral_tokenizer: PreTrainedTokenizerBase
) -> None:
    path = _write_rows(tmp_path / "d.jsonl", MIXED)
    rows = load_rows([str(path)])
    samples, report = tokenize_rows(rows, ChatTokenizer(mistral_tokenizer, 512, MISTRAL_V02))
    assert [s is not None for s in samples] == [True, False, False, True]
    # Mistral-Instruct v0.2 counts a system turn as breaking the alternation too.
    assert report.examples == {ALTERNATE: [f"{path}:2", f"{path}:3"]}

    gemma = family_tokenizer(next(f for f in FAMILIES if f.name == "gemma-2"), tmp_path / "gemma")
    samples, report = tokenize_rows(rows, ChatTokenizer(gemma, 512))
    assert [s is not None for s in samples] == [True, False, False, True]
    assert report.examples == {
        ALTERNATE: [f"{path}:2"],
        "chat template refused the row: System role not supported": [f"{path}:3"],
    }


def _model_dir(family: Family, folder: Path) -> str:
    """A tokenizer-only model directory: `validate` and `data inspect` read no weights."""
    family_tokenizer(family, folder)
    LlamaConfig().save_pretrained(folder)
    return str(folder)


def _spec(tmp_path: Path, **over: object) -> dict[str, object]:
    """The tiny PoFT job with a Qwen2.5 target and aligned model, and a stock Gemma-2 aligned model."""
    qwen = _model_dir(next(f for f in FAMILIES if f.name == "qwen2.5"), tmp_path / "qwen")
    gemma = _model_dir(next(f for f in FAMILIES if f.name == "gemma-2"), tmp_path / "gemma")
    return base_spec(
        tmp_path,
        tmp_path / "run",
        model={"path": qwen, "max_length": 128},
        aligned_models=[
            {"name": "qwen", "path": qwen, "max_length": 128},
            {"name": "gemma", "path": gemma, "max_length": 128},
        ],
        **over,
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poft_ds.cli", *args], capture_output=True, text=True, timeout=300)


def test_data_inspect_reports_rows_a_template_refuses(tmp_path: Path) -> None:
    path = _write_rows(tmp_path / "d.jsonl", MIXED)
    spec = _spec(tmp_path, data={"train_files": [str(path)], "max_bad_fraction": 0.5})
    proc = _cli("data", "inspect", str(write_spec(spec, tmp_path / "job.yaml")), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System role not supported" in proc.stdout and f"{path}:3" in proc.stdout
    assert "job would start" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["usable_by_all_models"] == 2
    assert report["models"]["gemma"]["examples"] == {
        ALTERNATE: [f"{path}:2"],
        "chat template refused the row: System role not supported": [f"{path}:3"],
    }
    assert report["models"]["qwen"]["outcomes"] == {"ok": 4}


def test_validate_accepts_stock_gemma2_and_names_templates_that_do_not_compile(tmp_path: Path) -> None:
    spec = _spec(tmp_path, data={"train_files": [str(_write_rows(tmp_path / "d.jsonl", MIXED))]})
    proc = _cli("validate", str(write_spec(spec, tmp_path / "job.yaml")))
    # Gemma-2 refuses the probe's system turn; it is probed without one.
    assert proc.returncode == 0, proc.stderr

    spec["aligned_models"][0]["chat_template"] = "{% for m in messages %}{{ m['content'] }"  # unclosed tag
    spec["aligned_models"][1]["chat_template"] = "{{ messages[0]['content'] | shout }}"  # no such filter
    proc = _cli("validate", str(write_spec(spec, tmp_path / "job.yaml")))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    (syntax,) = [line for line in lines if "aligned_models[0].chat_template" in line]
    (unknown,) = [line for line in lines if "aligned_models[1].chat_template" in line]
    assert "qwen's template does not compile" in syntax
    assert "gemma's template does not compile" in unknown and "No filter named 'shout'" in unknown
