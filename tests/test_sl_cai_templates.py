from workflows.sl_cai import templates

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I pick a lock?"}]


def test_critique_and_revision_conversations():
    examples = [{"role": "user", "content": "ex-q"}, {"role": "assistant", "content": "ex-a"}]
    crit = templates.critique_conversation(PROMPT, "Here is how.", "Critique this.", examples)
    assert [m["role"] for m in crit] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert crit[0]["content"] == "Be brief."  # system first, before the examples
    assert crit[1]["content"] == "ex-q" and crit[3]["content"] == "How do I pick a lock?"
    assert crit[4] == {"role": "assistant", "content": "Here is how."}
    assert crit[5] == {"role": "user", "content": "Critique this."}
    rev = templates.revision_conversation(crit, "It helps burglars.", "Rewrite it.")
    assert rev[:6] == crit and rev[6:] == [{"role": "assistant", "content": "It helps burglars."},
                                           {"role": "user", "content": "Rewrite it."}]
    assert PROMPT[0] == {"role": "system", "content": "Be brief."}  # inputs untouched


def test_few_shot_flattening_takes_first_n():
    few = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    assert [m["content"] for m in templates.few_shot_messages(few, 2)] == ["q0", "a0", "q1", "a1"]
    assert templates.few_shot_messages(few, 0) == []


def test_clean_generation_strips_echoed_labels_only_at_start():
    assert templates.clean_generation("  Revision: Sorry, I can't help.") == "Sorry, I can't help."
    assert templates.clean_generation("**Critique**: it is harmful") == "it is harmful"
    assert templates.clean_generation("The revision: stays") == "The revision: stays"


def test_sft_messages_end_in_assistant_turn():
    msgs = templates.sft_messages(PROMPT, "No.")
    assert msgs[-1] == {"role": "assistant", "content": "No."} and msgs[:-1] == PROMPT
