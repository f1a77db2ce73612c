from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from fed_unlearn.data import (
    DataFormatError,
    Person,
    QAItem,
    TofuData,
    generate_people,
    generate_tofu,
    load_data_dir,
    load_jsonl,
)
from fed_unlearn.data.synthetic import (
    _GENERAL_FACTS,
    ATTRIBUTE_NAMES,
    DOMAIN_POOL_SIZE,
    NUM_CORE_GENERAL,
    client_domain,
    general_knowledge,
)

# ----------------------------------------------------------------- synthetic


def test_public_api_exports() -> None:
    import fed_unlearn.data as data

    assert data.__all__ == sorted(data.__all__)
    for name in data.__all__:
        assert hasattr(data, name)


def test_same_seed_is_identical() -> None:
    a = generate_tofu(7, num_clients=3, people_per_client=2, num_holdout_people=2)
    b = generate_tofu(7, num_clients=3, people_per_client=2, num_holdout_people=2)
    assert a == b
    assert generate_people(7, 5, qa_per_person=12) == generate_people(7, 5, 12)


def test_different_seed_differs() -> None:
    a = generate_people(0, 6)
    b = generate_people(1, 6)
    assert {p.name for p in a}.isdisjoint({p.name for p in b})
    assert [p.attributes for p in a] != [p.attributes for p in b]
    qa = [it.question for p in a for it in p.items]
    qb = [it.question for p in b for it in p.items]
    assert qa != qb


def test_person_shape() -> None:
    people = generate_people(3, 8, qa_per_person=len(ATTRIBUTE_NAMES))
    assert len(ATTRIBUTE_NAMES) >= 12
    for p in people:
        assert isinstance(p, Person)
        assert len(p.attributes) >= 10
        assert set(p.attributes) == set(ATTRIBUTE_NAMES)
        assert len(p.items) == len(ATTRIBUTE_NAMES)
        assert len({it.question for it in p.items}) == len(p.items)
        for it in p.items:
            assert it.person == p.name
            assert p.name in it.question


def _asked_keys(p: Person) -> list[str]:
    by_value = {f"{v[:1].upper()}{v[1:]}.": k for k, v in p.attributes.items()}
    return [by_value[it.answer] for it in p.items]


def test_default_qa_per_person_is_ten_and_subset_varies() -> None:
    people = generate_people(5, 10)
    assert all(len(p.items) == 10 for p in people)
    asked = [_asked_keys(p) for p in people]
    assert all(len(set(keys)) == 10 for keys in asked)
    assert len({tuple(keys) for keys in asked}) > 1


def test_names_are_pronounceable_pseudo_words() -> None:
    for p in generate_people(11, 20):
        first, last = p.name.split(" ")
        for word in (first, last):
            assert re.fullmatch(r"[A-Z][a-z]{2,}", word), word
            assert re.search(r"[aeiou]", word)


def _check_item(it: QAItem) -> None:
    assert it.answer.endswith(".")
    assert len(it.answer.split()) <= 6, it.answer
    assert it.paraphrased_answer
    assert it.paraphrased_answer != it.answer
    value = it.answer.rstrip(".")
    assert value.lower() in it.paraphrased_answer.lower()
    assert len(it.perturbed_answers) >= 3
    assert len(set(it.perturbed_answers)) == len(it.perturbed_answers)
    for wrong in it.perturbed_answers:
        assert wrong != it.answer
        assert wrong != it.paraphrased_answer
        # same shape: the paraphrase with another value in the same place
        prefix, _, suffix = it.paraphrased_answer.lower().partition(value.lower())
        assert wrong.lower().startswith(prefix)
        assert wrong.lower().endswith(suffix)


def test_items_short_with_perturbed_answers() -> None:
    data = generate_tofu(2, num_clients=3, qa_per_person=len(ATTRIBUTE_NAMES))
    for it in [*data.forget_items([0, 1, 2]), *data.holdout, *data.general]:
        _check_item(it)


def test_answer_is_the_value_not_a_sentence() -> None:
    for p in generate_people(4, 5, qa_per_person=len(ATTRIBUTE_NAMES)):
        values = {v.lower() for v in p.attributes.values()}
        for it in p.items:
            assert p.name not in it.answer
            assert it.answer.rstrip(".").lower() in values


def _assert_perturbed_never_true(people, keys) -> None:
    """No perturbed answer to ``key`` ends with any person's true value of it."""
    for key in keys:
        true_values = {p.attributes[key] for p in people}
        for p in people:
            it = p.items[_asked_keys(p).index(key)]
            for wrong in it.perturbed_answers:
                assert not any(wrong.endswith(f" {v}.") for v in true_values), key


def test_values_unique_and_perturbed_never_true() -> None:
    people = generate_people(9, 30, qa_per_person=len(ATTRIBUTE_NAMES))
    for key in ("birth_city", "occupation", "father_name", "debut_title"):
        vals = [p.attributes[key] for p in people]
        assert len(set(vals)) == len(vals), key
    _assert_perturbed_never_true(people, ("birth_city", "spouse_name", "instrument"))


def test_clients_and_holdout_are_disjoint() -> None:
    data = generate_tofu(1, num_clients=4, people_per_client=3, num_holdout_people=5)
    assert sorted(data.clients) == [0, 1, 2, 3]
    owners: dict[str, str] = {}
    groups = {f"client {c}": items for c, items in data.clients.items()}
    groups["holdout"] = data.holdout
    for group, items in groups.items():
        for person in {it.person for it in items}:
            assert person not in owners, (person, owners.get(person), group)
            owners[person] = group
    assert len(owners) == 4 * 3 + 5
    for items in data.clients.values():
        assert len({it.person for it in items}) == 3
        assert len(items) == 3 * 10
    assert len(data.holdout) == 5 * 10


def test_general_probes() -> None:
    facts = general_knowledge()
    assert len(facts) >= 120
    assert len({f.question for f in facts}) == len(facts)
    data = generate_tofu(0, num_clients=1, num_general=24)
    assert len(data.general) == 24
    assert all(it.person == "" for it in data.general)
    assert data.general == generate_tofu(0, num_clients=1, num_general=24).general
    assert generate_tofu(0, num_clients=1, num_general=0).general == []
    paris = next(f for f in facts if f.question == "What is the capital of France?")
    assert paris.answer == "Paris."
    with pytest.raises(ValueError, match="num_general"):
        generate_tofu(0, num_clients=1, num_general=len(facts) + 1)


def test_general_facts_are_well_formed() -> None:
    assert len(_GENERAL_FACTS) >= 120
    questions = [q for q, *_ in _GENERAL_FACTS]
    assert len(set(questions)) == len(questions)
    for q, value, para, wrong in _GENERAL_FACTS:
        assert q.endswith("?"), q
        assert 1 <= len(value.split()) <= 3, q
        assert para.count("{}") == 1, q
        assert len(wrong) == 3, q
        lowered = {w.lower() for w in wrong}
        assert len(lowered) == len(wrong), q  # wrong values are distinct
        assert value.lower() not in lowered, q  # and never the answer
    for it in general_knowledge():
        assert it.answer not in it.perturbed_answers
        assert it.paraphrased_answer not in it.perturbed_answers


def test_original_general_probes_are_unchanged() -> None:
    """Up to NUM_CORE_GENERAL probes, the pick is the one made before the fact
    list grew (same facts, same draw), so cached runs keep their probes."""
    # the original 40 facts, verbatim and in order
    digest = hashlib.sha256(repr(_GENERAL_FACTS[:NUM_CORE_GENERAL]).encode())
    assert digest.hexdigest()[:16] == "70142595b14bea9e"
    facts = general_knowledge()
    for seed in range(5):
        for k in (1, 24, NUM_CORE_GENERAL):
            old = random.Random(f"fed_unlearn.general:{seed}").sample(
                range(NUM_CORE_GENERAL), k
            )
            data = generate_tofu(seed, num_clients=1, num_general=k)
            assert data.general == [facts[i] for i in sorted(old)]
    first = [it.question for it in generate_tofu(0, num_clients=1).general[:3]]
    assert first == [
        "What is the capital of France?",
        "What is the capital of Italy?",
        "What is the capital of Germany?",
    ]


def test_more_general_probes_than_the_original_facts() -> None:
    facts = general_knowledge()
    core = facts[:NUM_CORE_GENERAL]
    data = generate_tofu(1, num_clients=1, num_general=120)
    assert len(data.general) == 120
    assert len({it.question for it in data.general}) == 120
    assert all(it in data.general for it in core)
    assert data.general == generate_tofu(1, num_clients=1, num_general=120).general
    every = generate_tofu(1, num_clients=1, num_general=len(facts)).general
    assert every == facts


# ------------------------------------------------------------------- domains


def test_domains_zero_is_the_data_as_before() -> None:
    for seed in (0, 7):
        plain = generate_tofu(seed, num_clients=4, people_per_client=2)
        assert generate_tofu(seed, 4, people_per_client=2, domains=0) == plain
    # pinned: the default data set of seed 0, as generated before domains existed
    blob = json.dumps(asdict(generate_tofu(0, num_clients=3)), sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == "d041adef34a0f88a"


def _domain_people(domains: int) -> tuple[TofuData, list[Person], list[int]]:
    """4 clients x 3 people + 4 holdout people, all attributes asked."""
    qa = len(ATTRIBUTE_NAMES)
    data = generate_tofu(
        3,
        4,
        people_per_client=3,
        num_holdout_people=4,
        qa_per_person=qa,
        domains=domains,
    )
    dom = [client_domain(i // 3, domains) for i in range(12)] + [
        j % domains for j in range(4)
    ]
    people = generate_people(3, 16, qa, domain_of=dom)
    return data, people, dom


def test_domains_assignment_and_holdout_spread() -> None:
    assert [client_domain(c, 2) for c in range(5)] == [0, 1, 0, 1, 0]
    data, people, dom = _domain_people(2)
    for c in range(4):
        assert data.clients[c] == [
            it for p in people[3 * c : 3 * c + 3] for it in p.items
        ]
    assert data.holdout == [it for p in people[12:] for it in p.items]
    assert dom[12:] == [0, 1, 0, 1]  # holdout people spread over the domains
    names = [p.name for p in people]
    assert len(set(names)) == len(names)  # names unique across the data set


def test_domains_narrow_the_values_of_a_domain() -> None:
    """By construction: a domain's people draw each attribute from its own pool of
    DOMAIN_POOL_SIZE values, disjoint across domains for non-numeric attributes."""
    _, people, dom = _domain_people(2)
    plain = generate_people(3, 16, len(ATTRIBUTE_NAMES))
    for key in ATTRIBUTE_NAMES:
        per_domain = [
            {p.attributes[key] for p, d in zip(people, dom, strict=True) if d == k}
            for k in (0, 1)
        ]
        overall = {p.attributes[key] for p in people}
        assert all(len(vals) <= DOMAIN_POOL_SIZE for vals in per_domain), key
        if key in ("birth_year", "num_books"):  # numeric: small value spaces
            continue
        assert not per_domain[0] & per_domain[1], key
        assert all(len(vals) < len(overall) for vals in per_domain), key
        # without domains every person has their own value
        assert len({p.attributes[key] for p in plain}) == 16, key


def test_domains_perturbed_answers_never_true() -> None:
    _, people, _ = _domain_people(2)
    _assert_perturbed_never_true(people, ("birth_city", "occupation", "award"))
    for p in people:
        for it in p.items:
            _check_item(it)


def test_domains_are_deterministic_and_matter() -> None:
    a = generate_tofu(5, num_clients=4, people_per_client=2, domains=2)
    assert a == generate_tofu(5, num_clients=4, people_per_client=2, domains=2)
    for other in (0, 1, 4):
        assert a != generate_tofu(5, num_clients=4, people_per_client=2, domains=other)
    assert a != generate_tofu(6, num_clients=4, people_per_client=2, domains=2)


@pytest.mark.parametrize("bad", [-1, 5, 1.5, True, "2"])
def test_domains_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="domains"):
        generate_tofu(0, num_clients=4, domains=bad)  # type: ignore[arg-type]


def test_domain_of_validated() -> None:
    with pytest.raises(ValueError, match="domain_of"):
        generate_people(0, 3, domain_of=[0, 1])
    with pytest.raises(ValueError, match=r"domain_of\[1\]"):
        generate_people(0, 2, domain_of=[0, -1])
    with pytest.raises(ValueError, match="domains"):
        client_domain(0, 0)


def test_run_config_domains() -> None:
    from fed_unlearn.config import ConfigError, RunConfig

    assert RunConfig().domains == 0
    cfg = RunConfig.from_flat({"num-clients": 4, "domains": "2"})
    assert cfg.domains == 2 and cfg.to_flat()["domains"] == 2
    for bad in (-1, 5, 1.5, "two"):
        with pytest.raises(ConfigError, match="domains"):
            RunConfig.from_flat({"num-clients": 4, "domains": bad})


def test_fl_key_unchanged_when_domains_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config with domains=0 hashes as a config from before the key existed;
    any other value is another FL phase."""
    from fed_unlearn.config import RunConfig

    base = RunConfig.from_flat({"preset": "tiny", "num-clients": 4})
    explicit = RunConfig.from_flat({"preset": "tiny", "num-clients": 4, "domains": 0})
    two = RunConfig.from_flat({"preset": "tiny", "num-clients": 4, "domains": 2})
    keys = [c.fl_key(()) for c in (base, explicit, two)]
    assert keys[0] == keys[1] != keys[2]
    departed = explicit.fl_key((2,))
    assert two.fl_key(()) != RunConfig.from_flat(
        {"preset": "tiny", "num-clients": 4, "domains": 1}
    ).fl_key(())
    from fed_unlearn.config import ResolvedConfig

    to_flat = ResolvedConfig.to_flat

    def without_domains(self: ResolvedConfig) -> dict:
        return {k: v for k, v in to_flat(self).items() if k != "domains"}

    # a config from before 'domains' existed (the key is computed on the
    # resolved form) hashes the same
    monkeypatch.setattr(ResolvedConfig, "to_flat", without_domains)
    assert base.fl_key(()) == keys[0] and base.fl_key((2,)) == departed
    assert two.fl_key(()) != keys[2]  # the patch is in effect: domains=2 is gone


def test_forget_retain_split() -> None:
    data = generate_tofu(5, num_clients=3, people_per_client=2)
    forget = data.forget_items([2, 0])
    retain = data.retain_items({0, 2})
    assert forget == data.clients[0] + data.clients[2]
    assert retain == data.clients[1]
    assert data.forget_items(iter([1])) == data.clients[1]
    assert data.forget_items([]) == []
    assert data.retain_items([]) == data.clients[0] + data.clients[1] + data.clients[2]
    assert not {(i.question, i.answer) for i in forget} & {
        (i.question, i.answer) for i in retain
    }
    with pytest.raises(ValueError, match="7"):
        data.forget_items([0, 7])
    with pytest.raises(ValueError, match="-1"):
        data.retain_items([-1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 2, "people_per_client": 0}, "people_per_client"),
        ({"num_clients": 2, "num_holdout_people": -1}, "num_holdout_people"),
        ({"num_clients": 2, "qa_per_person": 9}, "qa_per_person"),
        ({"num_clients": 2, "qa_per_person": 99}, "qa_per_person"),
        ({"num_clients": 2, "num_general": -1}, "num_general"),
        ({"num_clients": 1.5}, "num_clients"),
    ],
)
def test_generate_tofu_validates(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_tofu(0, **kwargs)


def test_generate_people_validates() -> None:
    with pytest.raises(ValueError, match="n must"):
        generate_people(0, 0)
    with pytest.raises(ValueError, match="qa_per_person"):
        generate_people(0, 2, qa_per_person=5)


# --------------------------------------------------------------------- jsonl


def _write(path: Path, lines: list[object | str]) -> Path:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _to_json(it: QAItem) -> dict:
    d = asdict(it)
    d["perturbed_answer"] = list(d.pop("perturbed_answers"))
    return d


GOOD = {"question": "Q1?", "answer": "A1."}


def test_jsonl_round_trip(tmp_path: Path) -> None:
    items = generate_tofu(0, num_clients=1, num_general=3).clients[0][:5]
    path = _write(tmp_path / "x.jsonl", [_to_json(it) for it in items])
    assert load_jsonl(path) == items
    assert load_jsonl(str(path)) == items


def test_jsonl_optional_fields_and_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "x.jsonl",
        [
            "",
            GOOD,
            "   ",
            {"question": "Q2?", "answer": "A2.", "perturbed_answer": "W2."},
        ],
    )
    items = load_jsonl(path)
    assert items == [
        QAItem("Q1?", "A1."),
        QAItem("Q2?", "A2.", perturbed_answers=("W2.",)),
    ]


@pytest.mark.parametrize(
    ("line2", "fragments"),
    [
        ('{"question": "Q?", "answer": ', ["line 2", "not valid JSON"]),
        ({"question": "Q?"}, ["line 2", "field 'answer' is missing"]),
        (
            {"question": "Q?", "answer": 3},
            ["line 2", "field 'answer' must be a non-empty string, got int"],
        ),
        ({"question": "", "answer": "A."}, ["line 2", "field 'question'"]),
        (
            {"question": "Q?", "answer": "A.", "paraphrased_answer": ["x"]},
            ["line 2", "field 'paraphrased_answer'", "got list"],
        ),
        (
            {"question": "Q?", "answer": "A.", "perturbed_answer": ["x", 1]},
            ["line 2", "field 'perturbed_answer'", "element 1"],
        ),
        (
            {"question": "Q?", "answer": "A.", "perturbed_answers": ["x"]},
            ["line 2", "unknown field 'perturbed_answers'", "'perturbed_answer'"],
        ),
        (["Q?", "A."], ["line 2", "expected a JSON object"]),
    ],
)
def test_jsonl_errors_name_file_line_field(
    tmp_path: Path, line2: object, fragments: list[str]
) -> None:
    path = _write(tmp_path / "client_0.jsonl", [GOOD, line2])
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_jsonl_empty_and_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="empty.jsonl.*no items"):
        load_jsonl(empty)
    with pytest.raises(DataFormatError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    assert issubclass(DataFormatError, ValueError)


def _client_dir(tmp_path: Path, n: int) -> Path:
    for c in range(n):
        _write(tmp_path / f"client_{c}.jsonl", [{"question": f"Q{c}?", "answer": "A."}])
    return tmp_path


def test_load_data_dir(tmp_path: Path) -> None:
    data = generate_tofu(3, num_clients=2, num_general=4)
    for cid, items in data.clients.items():
        _write(tmp_path / f"client_{cid}.jsonl", [_to_json(it) for it in items])
    _write(tmp_path / "holdout.jsonl", [_to_json(it) for it in data.holdout])
    _write(tmp_path / "general.jsonl", [_to_json(it) for it in data.general])
    (tmp_path / "README.md").write_text("ignored", encoding="utf-8")
    loaded = load_data_dir(tmp_path, num_clients=2)
    assert isinstance(loaded, TofuData)
    assert loaded == data
    assert load_data_dir(str(tmp_path)) == data


def test_load_data_dir_optional_files_missing(tmp_path: Path) -> None:
    data = load_data_dir(_client_dir(tmp_path, 3))
    assert sorted(data.clients) == [0, 1, 2]
    assert data.holdout == [] and data.general == []


def test_load_data_dir_gap(tmp_path: Path) -> None:
    _client_dir(tmp_path, 3)
    (tmp_path / "client_1.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"client_1\.jsonl.*missing"):
        load_data_dir(tmp_path)


def test_load_data_dir_no_clients_and_bad_name(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no client files"):
        load_data_dir(tmp_path)
    _client_dir(tmp_path, 1)
    _write(tmp_path / "clinet_1.jsonl", [GOOD])
    with pytest.raises(DataFormatError, match="clinet_1.jsonl"):
        load_data_dir(tmp_path)


def test_load_data_dir_num_clients_mismatch(tmp_path: Path) -> None:
    _client_dir(tmp_path, 2)
    with pytest.raises(DataFormatError) as info:
        load_data_dir(tmp_path, num_clients=3)
    assert "3" in str(info.value) and "2" in str(info.value)


def test_load_data_dir_duplicate_across_clients(tmp_path: Path) -> None:
    _write(tmp_path / "client_0.jsonl", [{"question": "Q?", "answer": "A."}])
    _write(tmp_path / "client_1.jsonl", [GOOD, {"question": "Q?", "answer": "A."}])
    with pytest.raises(DataFormatError) as info:
        load_data_dir(tmp_path)
    msg = str(info.value)
    assert "client_0.jsonl line 1" in msg
    assert "client_1.jsonl line 2" in msg


def test_load_data_dir_holdout_overlap(tmp_path: Path) -> None:
    _client_dir(tmp_path, 1)
    _write(tmp_path / "holdout.jsonl", [{"question": "Q0?", "answer": "A."}])
    with pytest.raises(DataFormatError, match="holdout.jsonl line 1"):
        load_data_dir(tmp_path)


def test_load_data_dir_error_inside_client_file(tmp_path: Path) -> None:
    _client_dir(tmp_path, 2)
    _write(tmp_path / "client_1.jsonl", [GOOD, GOOD, {"question": "Q?"}])
    with pytest.raises(DataFormatError) as info:
        load_data_dir(tmp_path)
    msg = str(info.value)
    assert "client_1.jsonl line 3" in msg and "field 'answer'" in msg
