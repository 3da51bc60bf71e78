"""The soft assignments and the three regularisers against hand-computed values."""

import math

import pytest
import torch

from splitnet.backbones import wide_resnet
from splitnet.grouping import (
    GroupAssignments,
    SoftGroups,
    balance_costs,
    disjoint_costs,
    group_weight_costs,
    group_weight_scales,
    weight_energy,
)
from splitnet.bench import SCHEDULE
from splitnet.module import SplitNetModule
from splitnet.plan import SplitLevel, SplitPlan, parse_groups
from tests.conftest import TINY_BACKBONE, TINY_SPLIT, DispatchedOperations


def one_hot(labels: list[int], groups: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), groups).T.double()


def disjoint_cost(q: torch.Tensor) -> torch.Tensor:
    return disjoint_costs(q, torch.ones(q.shape[1], 1, dtype=q.dtype))[0]


def balance_cost(q: torch.Tensor) -> torch.Tensor:
    return balance_costs(q, torch.ones(q.shape[1], 1, dtype=q.dtype))[0]


def group_weight_cost(weight: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """S of one layer, through the batched ``group_weight_costs``."""
    rows, cols = group_weight_scales(p.shape[0], weight.shape[1], weight.shape[0], weight[0, 0].numel())
    return group_weight_costs(weight_energy(weight)[None], SoftGroups(p[None].square(), 1 - p[None]),
                              SoftGroups(q[None].square(), 1 - q[None]), torch.tensor([rows]), torch.tensor([cols]))[0]


def test_disjoint_is_one_for_uniform_and_zero_for_one_hot_columns():
    for groups, dim in ((2, 6), (4, 12), (8, 64)):
        assert disjoint_cost(torch.full((groups, dim), 1 / groups)).item() == pytest.approx(1.0)
        assert disjoint_cost(one_hot([d % groups for d in range(dim)], groups)).item() == 0.0


def test_disjoint_hand_computed():
    # <q0, q1> = 0.75*0.25 + 0.5*0.5 = 0.4375; normaliser D (G-1) / (2G) = 2 * 1 / 4 = 0.5
    q = torch.tensor([[0.75, 0.5], [0.25, 0.5]])
    assert disjoint_cost(q).item() == pytest.approx(0.875)


def test_balance_is_one_for_equal_groups_and_g_when_all_in_one():
    for groups in (2, 4, 8):
        dim = 3 * groups
        assert balance_cost(one_hot([d % groups for d in range(dim)], groups)).item() == pytest.approx(1.0)
        assert balance_cost(one_hot([0] * dim, groups)).item() == pytest.approx(groups)


def test_balance_hand_computed():
    # group sums 1.25 and 0.75: (1.5625 + 0.5625) / (D^2 / G = 2) = 1.0625
    q = torch.tensor([[0.75, 0.5], [0.25, 0.5]])
    assert balance_cost(q).item() == pytest.approx(1.0625)


def test_groupings_side_by_side_cost_what_each_costs_alone():
    torch.manual_seed(0)
    groupings = [torch.softmax(torch.randn(3, dim, dtype=torch.float64), 0) for dim in (5, 12, 7)]
    segments = torch.block_diag(*[torch.ones(q.shape[1], 1, dtype=torch.float64) for q in groupings])
    side_by_side = torch.cat(groupings, 1)
    # T by its definition, sum over pairs g > h of <q_g, q_h> over D (G - 1) / (2G)
    pairs = [sum(q[g] @ q[h] for g in range(3) for h in range(g)) / (q.shape[1] * 2 / 6) for q in groupings]
    torch.testing.assert_close(disjoint_costs(side_by_side, segments), torch.stack(pairs))
    # U by its definition, sum_g (sum_d q_g[d])^2 over D^2 / G
    sizes = [q.sum(1).square().sum() / (q.shape[1] ** 2 / 3) for q in groupings]
    torch.testing.assert_close(balance_costs(side_by_side, segments), torch.stack(sizes))


def test_group_weight_hand_computed_linear():
    # W = [[a, b], [c, d]] (outputs x inputs), input i and output i in group i. The off-block weights are
    # b (input 1 -> output 0) and c (input 0 -> output 1): rows and cols each give (|b| + |c|) / (2 sqrt 2),
    # the normaliser 2 (G-1) std / G = sqrt(1/2), so S = |b| + |c|.
    a, b, c, d = 0.3, -0.7, 0.2, 1.1
    weight = torch.tensor([[a, b], [c, d]], dtype=torch.float64)
    eye = one_hot([0, 1], 2)
    assert group_weight_cost(weight, eye, eye).item() == pytest.approx(abs(b) + abs(c))


def test_group_weight_conv_uses_mean_over_taps():
    # Same as above with 3x3 kernels: M is the mean of the squared taps, std = sqrt(1 / (9 I)).
    weight = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    weight[0, 1] = 0.5  # every tap of the off-block weight input 1 -> output 0
    eye = one_hot([0, 1], 2)
    expected = 2 * 0.5 / (2 * math.sqrt(2)) / math.sqrt(1 / 18)
    assert group_weight_cost(weight, eye, eye).item() == pytest.approx(expected)


def test_group_weight_zero_for_block_diagonal_and_grows_off_block():
    torch.manual_seed(0)
    groups, inputs, outputs = 4, 16, 8
    p = one_hot([i % groups for i in range(inputs)], groups)
    q = one_hot([o % groups for o in range(outputs)], groups)
    block = (q.T @ p).bool()  # output o and input i share a group
    weight = torch.randn(outputs, inputs, 3, 3, dtype=torch.float64) * block[:, :, None, None]
    assert group_weight_cost(weight, p, q).item() < 1e-12
    previous = 0.0
    for scale in (0.01, 0.1, 1.0):
        leaked = weight + scale * torch.randn_like(weight) * (~block)[:, :, None, None]
        cost = group_weight_cost(leaked, p, q).item()
        assert cost > previous
        previous = cost


def literal_group_weight_cost(weight: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """S as method.md writes it, term by term (slow): the reference for group_weight_cost."""
    groups, inputs = p.shape
    outputs = q.shape[1]
    energy = weight.square().flatten(2).mean(2).T if weight.dim() > 2 else weight.square().T  # M: I x O
    std = math.sqrt(1.0 / (weight[0, 0].numel() * inputs))
    total = weight.new_zeros(())
    for g in range(groups):
        row = sum(torch.sqrt((energy[i] * q[g].square() * (1 - p[g, i]) ** 2).sum()) for i in range(inputs))
        col = sum(torch.sqrt((energy[:, j] * (1 - q[g, j]) ** 2 * p[g].square()).sum()) for j in range(outputs))
        total = total + row / (inputs * math.sqrt(outputs)) + col / (math.sqrt(inputs) * outputs)
    return total / (2 * (groups - 1) * std / groups)


@pytest.mark.parametrize("shape", [(6, 10), (6, 10, 3, 3)])
@pytest.mark.parametrize("groups", [2, 3])
def test_group_weight_equals_its_definition_with_its_gradients(shape: tuple[int, ...], groups: int):
    torch.manual_seed(groups)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    alpha_in = torch.randn(groups, shape[1], dtype=torch.float64, requires_grad=True)
    alpha_out = torch.randn(groups, shape[0], dtype=torch.float64, requires_grad=True)
    leaves = (weight, alpha_in, alpha_out)

    def value_and_gradients(cost):
        value = cost(weight, torch.softmax(alpha_in, 0), torch.softmax(alpha_out, 0))
        return value, torch.autograd.grad(value, leaves)

    value, gradients = value_and_gradients(group_weight_cost)
    expected, expected_gradients = value_and_gradients(literal_group_weight_cost)
    torch.testing.assert_close(value, expected)
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected_gradient)


def test_group_weight_of_an_unconnected_channel_has_finite_gradients_matching_the_definition():
    """An input or output whose weights are all exactly zero (the fade leaves such blocks) has a zero group lasso
    term; its gradient is the subgradient 0, so the assignments' gradients equal those of the definition with those
    weights vanishingly small instead, and the weights' elsewhere."""
    torch.manual_seed(0)
    weight = torch.randn(6, 10, 3, 3, dtype=torch.float64)
    unconnected = torch.zeros_like(weight, dtype=torch.bool)
    unconnected[:, 0] = unconnected[1] = True  # input 0 and output 1
    alpha_in = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    alpha_out = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)

    def value_and_gradients(cost, vanishing: float):
        w = torch.where(unconnected, vanishing * torch.randn_like(weight), weight).requires_grad_()
        value = cost(w, torch.softmax(alpha_in, 0), torch.softmax(alpha_out, 0))
        return (value, *torch.autograd.grad(value, (w, alpha_in, alpha_out)))

    value, weight_grad, *alpha_grads = value_and_gradients(group_weight_cost, 0.0)
    expected, expected_weight_grad, *expected_alpha_grads = value_and_gradients(literal_group_weight_cost, 1e-30)
    torch.testing.assert_close(value, expected)
    assert torch.isfinite(weight_grad).all() and not weight_grad[unconnected].any()
    torch.testing.assert_close(weight_grad[~unconnected], expected_weight_grad[~unconnected])
    for gradient, expected_gradient in zip(alpha_grads, expected_alpha_grads, strict=True):
        torch.testing.assert_close(gradient, expected_gradient)


def literal_terms(grouping: GroupAssignments, model: torch.nn.Module) -> list[torch.Tensor]:
    """The three terms layer by layer and grouping by grouping, from the definitions (the reference for the batched
    computation); an upper level's groups are merged by summing each run of G_upper / G consecutive groups."""
    probs = {key: torch.softmax(alpha, 0) for key, alpha in grouping.logits.items()}

    def level_grouping(level: int, name: str) -> torch.Tensor:
        source_level, key = grouping.plan.source(level, name)
        q = probs[key]
        ratio = grouping.groups[source_level] // grouping.groups[level]
        return torch.stack([q[g * ratio:(g + 1) * ratio].sum(0) for g in range(grouping.groups[level])])

    costs = []
    for index, level in enumerate(grouping.plan.levels):
        if grouping.groups[index] == 1:
            continue
        for name, (in_name, out_name) in level.layers.items():
            weight = model.get_submodule(f"{level.module}.{name}").weight
            p, q = level_grouping(index, in_name), level_grouping(index, out_name)
            costs.append(literal_group_weight_cost(weight, p, q))
    costs = torch.stack(costs)
    pair_sums = [sum(q[g] @ q[h] for g in range(len(q)) for h in range(g)) for q in probs.values()]
    return [
        torch.stack([t / (q.shape[1] * (len(q) - 1) / (2 * len(q))) for t, q in zip(pair_sums, probs.values())]).mean(),
        (costs.detach() * costs).sum() / costs.detach().sum(),
        torch.stack([q.sum(1).square().sum() / (q.shape[1] ** 2 / len(q)) for q in probs.values()]).mean(),
    ]


@pytest.mark.parametrize("split", ["2-2-2", "1-2-4", "2-4-4", "2-4-8"])
def test_regularisers_of_a_network_equal_their_definitions_with_their_gradients(split: str):
    """The groupings of one group count, and its layers of one shape, are computed at once: the terms and every
    gradient equal the layer-by-layer definitions (layers of several shapes, 1x1 and 3x3 kernels, groupings
    shared by layers of different shapes, upper-level groups merged once or twice)."""
    torch.manual_seed(0)
    model = wide_resnet(10, 1, num_classes=10).double()
    groups = parse_groups(split, model.split_plan)
    grouping = GroupAssignments(model.split_plan, groups, model).double()
    with torch.no_grad():
        for alpha in grouping.parameters():
            alpha.normal_()  # far from uniform, so that every term and gradient is far from its starting value
    leaves = [*grouping.parameters(), *model.parameters()]

    def values_and_gradients(terms: list[torch.Tensor]):
        total = terms[0] + 2 * terms[1] + 3 * terms[2]
        return terms, [g for g in torch.autograd.grad(total, leaves, allow_unused=True) if g is not None]

    terms = grouping.regularisers(model)
    batched, gradients = values_and_gradients([terms.disjoint, terms.group_weight, terms.balance])
    expected, expected_gradients = values_and_gradients(literal_terms(grouping, model))
    torch.testing.assert_close(batched, expected)
    assert len(gradients) == len(expected_gradients) > len(grouping.logits)
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected_gradient)


def test_regularisers_take_a_few_operations_per_layer():
    """A layer whose group count and shape are already there adds only its weight energy's operations (forward and
    backward, about 16 with views); the rest is done once per group count and shape (the layer-by-layer computation
    took about 90 per layer)."""
    counts = {}
    for depth in (10, 22):  # 7 and 15 split layers
        net = wide_resnet(depth, 1, num_classes=10)
        grouping = GroupAssignments(net.split_plan, parse_groups("2-2-2", net.split_plan), net)
        with DispatchedOperations() as operations:
            terms = grouping.regularisers(net)
            (terms.disjoint + terms.group_weight + terms.balance).backward()
        counts[depth] = len(operations.names)
    assert (counts[22] - counts[10]) / 8 <= 20


def test_assignments_are_softmax_over_groups_and_learn_from_the_regularisers():
    torch.manual_seed(0)
    model = wide_resnet(16, 1, num_classes=10)
    plan = model.split_plan
    groups = parse_groups("2-2-2", plan)
    assignments = GroupAssignments(plan, groups, model)
    for key, q in assignments.probabilities().items():
        assert q.shape[0] == 2
        torch.testing.assert_close(q.sum(0), torch.ones(q.shape[1]))
        assert assignments.logits[key].std().item() == pytest.approx(0.01, rel=0.3)
    optimizer = torch.optim.SGD(assignments.parameters(), lr=1.0)
    start = assignments.regularisers(model)
    for _ in range(50):
        terms = assignments.regularisers(model)
        optimizer.zero_grad()
        (terms.disjoint + terms.group_weight).backward()
        optimizer.step()
    end = assignments.regularisers(model)
    assert end.disjoint < start.disjoint and end.group_weight < start.group_weight


def test_split_semantics_purity_and_nmi():
    from splitnet.report import split_semantics

    superclass_of = [0, 0, 1, 1, 2, 2, 3, 3]
    perfect = split_semantics([[0, 1, 2, 3], [4, 5, 6, 7]], superclass_of)
    assert perfect["superclass_purity"] == 1.0
    # I(leaf; superclass) = H(leaf) = log 2, H(superclass) = log 4: NMI = 2 log2 / (log2 + log4) = 2/3
    assert perfect["nmi"] == pytest.approx(2 / 3)
    crossed = split_semantics([[0, 2, 4, 6], [1, 3, 5, 7]], superclass_of)
    assert crossed == {"superclass_purity": 0.0, "nmi": 0.0}
    half = split_semantics([[0, 1, 2, 4], [3, 5, 6, 7]], superclass_of)
    assert half["superclass_purity"] == 0.5


@pytest.mark.parametrize("setting", [{"compile": True}, {"compile_regularisers": True}])
def test_compiled_regularisers_equal_the_eager_ones_with_their_gradients(setting: dict):
    """model.compile also compiles the regularisers (their small operations fused), and model.compile_regularisers
    compiles only them: same terms, same gradients."""
    torch.manual_seed(0)
    module = SplitNetModule(TINY_BACKBONE, 10, TINY_SPLIT, SCHEDULE, **setting)
    assert module._regularisers != module.grouping.regularisers  # bound methods compare equal when they are one
    assert (module._compiled_net is None) == ("compile" not in setting)

    def terms_and_gradients(regularisers):
        module.zero_grad()
        terms = regularisers(module.net)
        module.regularisation(terms).backward()
        return terms, [alpha.grad.clone() for alpha in module.grouping.parameters()]

    eager_terms, eager_gradients = terms_and_gradients(module.grouping.regularisers)
    compiled_terms, compiled_gradients = terms_and_gradients(module._regularisers)
    for name in ("disjoint", "group_weight", "balance"):
        torch.testing.assert_close(getattr(compiled_terms, name), getattr(eager_terms, name))
    for eager, compiled in zip(eager_gradients, compiled_gradients, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_regularisers_are_computed_in_float32_under_bf16_autocast():
    """Training on a GPU runs under bf16 autocast; the regularisers (small matmuls of assignments and weight energies)
    keep float32, so their values and gradients do not depend on the trainer's precision."""
    torch.manual_seed(0)
    net = wide_resnet(10, 1, num_classes=10)
    groups = parse_groups("2-2-2", net.split_plan)
    grouping = GroupAssignments(net.split_plan, groups, net)

    def terms_and_gradients(autocast: bool):
        grouping.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            terms = grouping.regularisers(net)
        (terms.disjoint + terms.group_weight + terms.balance).backward()
        return terms, [alpha.grad.clone() for alpha in grouping.parameters()]

    full, full_gradients = terms_and_gradients(autocast=False)
    mixed, mixed_gradients = terms_and_gradients(autocast=True)
    for name in ("disjoint", "group_weight", "balance"):
        assert getattr(mixed, name).dtype == torch.float32
        torch.testing.assert_close(getattr(mixed, name), getattr(full, name))
    for expected, actual in zip(full_gradients, mixed_gradients, strict=True):
        torch.testing.assert_close(actual, expected)


def planted_layer(
    inputs: int = 64, outputs: int = 32, leak: float = 0.1
) -> tuple[torch.nn.Module, GroupAssignments, torch.Tensor, torch.Tensor]:
    """A linear layer whose weights form 2 blocks (a random balanced grouping of its inputs and outputs; the
    off-block weights ``leak`` times smaller), its assignments, and the planted input and output groups."""
    generator = torch.Generator().manual_seed(0)
    in_groups = torch.randperm(inputs, generator=generator) % 2
    out_groups = torch.randperm(outputs, generator=generator) % 2
    same = (out_groups[:, None] == in_groups[None, :]).float()
    model = torch.nn.ModuleDict({"head": torch.nn.ModuleDict({"fc": torch.nn.Linear(inputs, outputs)})})
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.randn(outputs, inputs, generator=generator) / inputs**0.5
                                   * (same + leak * (1 - same)))
    plan = SplitPlan((), (SplitLevel("head", {"fc": ("in", "out")}),))
    torch.manual_seed(0)
    return model, GroupAssignments(plan, (2,), model), in_groups, out_groups


def test_a_level_that_is_one_layer_is_found_by_the_levels_name():
    """AlexNet's classifier level is the layer itself (layer name ""): the same terms as when it is named."""
    model, named, _, _ = planted_layer()
    level_model = torch.nn.ModuleDict({"fc": model.head.fc})
    unnamed = GroupAssignments(SplitPlan((), (SplitLevel("fc", {"": ("in", "out")}),)), (2,), level_model)
    for alpha, same in zip(unnamed.parameters(), named.parameters(), strict=True):
        alpha.data.copy_(same.data)
    terms, expected_terms = unnamed.regularisers(level_model), named.regularisers(model)
    for term, expected in zip(vars(terms).values(), vars(expected_terms).values(), strict=True):
        torch.testing.assert_close(term, expected)


@pytest.mark.parametrize("normalise", [False, True])
def test_unit_rms_gradients_recover_planted_blocks_in_a_few_steps(normalise: bool):
    """The regularisers' gradient is ~5e-5 per logit here (~1e-6 on WRN-16-8): 50 plain SGD steps leave the
    assignments uniform; rescaled to unit RMS, the same steps harden them onto the planted blocks."""
    model, assignments, in_groups, out_groups = planted_layer()
    optimizer = torch.optim.SGD(assignments.parameters(), lr=0.02, momentum=0.9, nesterov=True)
    for _ in range(50):
        terms = assignments.regularisers(model)
        optimizer.zero_grad()
        (terms.group_weight + 10 * terms.balance).backward()
        if normalise:
            assignments.normalise_gradients()
            assert all(alpha.grad.square().mean().item() == pytest.approx(1.0) for alpha in assignments.parameters())
        optimizer.step()
    probs = assignments.probabilities()
    moved = max((q - 0.5).abs().max().item() for q in probs.values())
    if not normalise:
        assert moved < 0.02
        return
    assert moved > 0.49 and max(disjoint_cost(q).item() for q in probs.values()) < 0.01
    # the planted groups up to a swap of their names, the same swap for the inputs and the outputs
    swap = (probs["head:out"].argmax(0) != out_groups).all()
    for key, planted in (("head:in", in_groups), ("head:out", out_groups)):
        assert torch.equal(probs[key].argmax(0), planted ^ int(swap))


def test_normalise_gradients_leaves_a_zero_gradient_and_a_missing_one_alone():
    model, assignments, _, _ = planted_layer()
    first, second = assignments.parameters()
    first.grad = torch.zeros_like(first)
    assignments.normalise_gradients()
    assert torch.equal(first.grad, torch.zeros_like(first)) and second.grad is None
