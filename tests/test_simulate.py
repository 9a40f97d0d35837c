"""Tests of simulate.py, the toy model of Sec. 3.3 / 3.4 (Fig. 4, Fig. 5, Eq. (7), (8), (10)-(14)).

Expected values are worked out by hand (3-4-5 triangles) or by a plain loop over the points.
"""
import math

import pytest
import torch

import simulate


def points(*rows) -> torch.Tensor:
    """One trial of peers: points((x1, y1), (x2, y2), ...) -> (1, M, 2) float64."""
    return torch.tensor([rows], dtype=torch.float64)


def test_unit_vector_and_zero_vector():
    vectors = torch.tensor([[3.0, 4.0], [0.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    expected = [[0.6, 0.8], [0.0, -1.0], [0.0, 0.0]]
    assert torch.allclose(simulate.unit(vectors), torch.tensor(expected, dtype=torch.float64))


def test_ensemble_is_midpoint_of_two_and_centroid_of_three():
    assert simulate.peer_mean(points((0, 0), (2, 4))).tolist() == [[[1.0, 2.0]]]
    assert simulate.peer_mean(points((0, 0), (3, 0), (0, 6))).tolist() == [[[1.0, 2.0]]]


def test_teacher_ensemble_without_own_peer_eq10():
    expected = [[[1.5, 3.0], [0.0, 3.0], [1.5, 0.0]]]
    assert simulate.leave_one_out_mean(points((0, 0), (3, 0), (0, 6))).tolist() == expected


def test_eq7_one_student_step_two_peers_by_hand():
    # S_1 = (3, 0), S_2 = (3, 4), E = (3, 2), T_1 = (1, 1), T_2 = (6, 4), eta = 0.1.
    # S_1: unit(Y - S_1) = (-1, 0), unit(E - S_1) = (0, 1), unit(T_2 - S_1) = (0.6, 0.8).
    # S_2: unit(Y - S_2) = (-0.6, -0.8), unit(E - S_2) = (0, -1),
    #      unit(T_1 - S_2) = (-2, -3) / sqrt(13).
    students, teachers = points((3, 0), (3, 4)), points((1, 1), (6, 4))
    root = math.sqrt(13)
    expected = [[3 + 0.1 * (-1 + 0 + 0.6), 0 + 0.1 * (0 + 1 + 0.8)],
                [3 + 0.1 * (-0.6 + 0 - 2 / root), 4 + 0.1 * (-0.8 - 1 - 3 / root)]]
    stepped = simulate.student_step(students, teachers, 0.0, 0.1)
    assert torch.allclose(stepped[0], torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(stepped[0, 0], torch.tensor([2.96, 0.18], dtype=torch.float64))


def test_eq8_ema_step_by_hand():
    teachers, students = points((1, 1)), points((2.96, 0.18))
    assert torch.allclose(simulate.ema_step(teachers, students, 0.5), points((1.98, 0.59)))
    assert torch.allclose(simulate.ema_step(teachers, students, 0.9), points((1.196, 0.918)))


def test_eq12_weighted_step_three_peers_by_hand():
    # S_1 = (0, 5), S_2 = (3, 5), S_3 = (-3, 8): E = (0, 6), unit(E - S_1) = (0, 1),
    # unit(Y - S_1) = (0, -1). T_2 = (3, 9), T_3 = (-4, 8): unit(T_2 - S_1) = (0.6, 0.8),
    # unit(T_3 - S_1) = (-0.8, 0.6), so L_dk pulls by (-0.1, 0.7); E_bar_1 = (-0.5, 8.5) and
    # unit(E_bar_1 - S_1) = (-0.5, 3.5) / sqrt(12.5).
    students = points((0, 5), (3, 5), (-3, 8))
    teachers = points((1, 1), (3, 9), (-4, 8))
    root = math.sqrt(12.5)
    for weight in (0.0, 0.25, 1.0):
        direction = (weight * -0.5 / root + (1 - weight) * -0.1,
                     weight * 3.5 / root + (1 - weight) * 0.7)
        stepped = simulate.student_step(students, teachers, weight, 0.1)
        expected = torch.tensor([0.1 * direction[0], 5 + 0.1 * direction[1]], dtype=torch.float64)
        assert torch.allclose(stepped[0, 0], expected)


def test_teacher_pull_matches_a_loop_over_pairs():
    generator = torch.Generator().manual_seed(3)
    students = torch.randn(4, 5, 2, generator=generator, dtype=torch.float64)
    teachers = torch.randn(4, 5, 2, generator=generator, dtype=torch.float64)
    pull = simulate.teacher_pull(students, teachers)
    for trial in range(4):
        for i in range(5):
            total = [0.0, 0.0]
            for j in range(5):
                if j != i:
                    dx, dy = (teachers[trial, j] - students[trial, i]).tolist()
                    total[0] += dx / math.hypot(dx, dy) / 4
                    total[1] += dy / math.hypot(dx, dy) / 4
            assert pull[trial, i].tolist() == pytest.approx(total)


def test_teacher_initialisation_copies_then_steps_towards_truth():
    # (3, 4) moves 2 * 0.1 along -(0.6, 0.8); (0.05, 0) overshoots Y to (-0.05, 0) and comes back.
    students = points((3, 4), (0.05, 0))
    assert torch.allclose(simulate.initialise_teachers(students, 2, 0.1),
                          points((2.88, 3.84), (0.05, 0)))
    copy = simulate.initialise_teachers(students, 0, 0.1)
    assert torch.equal(copy, students) and copy.data_ptr() != students.data_ptr()


@pytest.mark.parametrize("decay, expected", [
    ("exp", [1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)]),
    ("cos", [1.0, 0.5 + 0.25 * math.sqrt(2), 0.5, 0.5 - 0.25 * math.sqrt(2)]),
    ("linear", [1.0, 0.75, 0.5, 0.25]),
])
def test_decay_weights_used_by_the_simulation(decay, expected):
    assert simulate.teacher_ensemble_weights("dkel", 4, decay, 0.5) == pytest.approx(expected)
    assert simulate.teacher_ensemble_weights("pcl", 4, decay, 0.5) == [0.0] * 4
    assert simulate.teacher_ensemble_weights("dk", 4, decay, 0.5) == [0.0] * 4


def test_one_simulated_epoch_by_hand():
    # The two-peer step above, then Eq. (8) with alpha = 0.5 for both teachers.
    students, teachers = points((3, 0), (3, 4)), points((1, 1), (6, 4))
    root = math.sqrt(13)
    second = (3 + 0.1 * (-0.6 - 2 / root), 4 + 0.1 * (-1.8 - 3 / root))
    teacher_2 = (0.5 * 6 + 0.5 * second[0], 0.5 * 4 + 0.5 * second[1])
    gaps = simulate.simulate(students, teachers, [0.0], 0.1, 0.5)
    assert gaps.shape == (2, 1)
    assert gaps[0, 0].item() == pytest.approx((math.sqrt(2) + math.sqrt(52)) / 2)
    assert gaps[1, 0].item() == pytest.approx((math.hypot(1.98, 0.59) + math.hypot(*teacher_2)) / 2)


def test_initial_points_on_circle_and_in_disc():
    generator = torch.Generator().manual_seed(0)
    circle = simulate.initial_points(20_000, 3, 2.0, "circle", generator)
    assert circle.shape == (20_000, 3, 2)
    assert torch.allclose(circle.norm(dim=-1), torch.full((20_000, 3), 2.0, dtype=torch.float64))
    assert circle.mean(dim=(0, 1)).abs().max() < 0.02
    disc = simulate.initial_points(20_000, 3, 2.0, "disc", generator).norm(dim=-1)
    assert disc.max() <= 2.0 and disc.mean().item() == pytest.approx(2 * 2.0 / 3, abs=0.01)


def test_convergence_epoch_definition():
    assert simulate.convergence_epoch([10, 5, 2, 1.1, 1.05, 1.0], 0.02) == 3
    assert simulate.convergence_epoch([10, 5, 2, 1.1, 1.05, 1.0], 0.2) == 2
    assert simulate.convergence_epoch([10, 0.5, 3, 1.1, 1.0], 0.02) == 3


def test_montecarlo_teachers_start_as_copy_for_pcl_and_one_step_ahead_for_dk():
    args = simulate.build_parser().parse_args(["montecarlo", "--trials", "50", "--epochs", "3"])
    curves = simulate.run_montecarlo(args)
    radius = math.log(100)
    assert curves["pcl"].shape == (4, 50)
    assert torch.allclose(curves["pcl"][0], torch.full((50,), radius, dtype=torch.float64))
    assert torch.allclose(curves["dkel"][0], torch.full((50,), radius - 0.1, dtype=torch.float64))


def test_montecarlo_is_seeded_and_writes_its_files(tmp_path, capsys):
    flags = ["--trials", "300", "--epochs", "12"]
    runs = {"a": ["--seed", "1"], "b": ["--seed", "1"], "c": ["--seed", "2"]}
    threads = torch.get_num_threads()
    for name, seed in runs.items():
        simulate.main(["montecarlo", *flags, *seed, "--out-dir", str(tmp_path / name)])
    assert torch.get_num_threads() == threads
    text = {name: (tmp_path / name / "montecarlo.csv").read_text() for name in runs}
    assert text["a"] == text["b"] and text["a"] != text["c"]
    lines = text["a"].splitlines()
    assert lines[0] == "epoch,pcl_mean,pcl_std,dk_mean,dk_std,dkel_mean,dkel_std"
    assert len(lines) == 1 + 13 and lines[-1].startswith("12,")
    assert (tmp_path / "a" / "montecarlo.png").read_bytes()[:4] == b"\x89PNG"
    assert "converged" in capsys.readouterr().out


def test_ideal_experiment_figure_and_the_case_it_illustrates(tmp_path, capsys):
    simulate.main(["ideal", "--out-dir", str(tmp_path)])
    assert (tmp_path / "ideal.png").read_bytes()[:4] == b"\x89PNG"
    assert "DK, random teacher" in capsys.readouterr().out
    args = simulate.build_parser().parse_args(["ideal"])
    measured = {title: simulate.ideal_distances(*rest) for title, *rest in
                simulate.ideal_scenarios(args)}
    random = measured["DK, random teacher"]
    proposed = measured["DK, proposed init (init_iters = 1)"]
    # S_1 = (-0.5, 0.3), T_2 = (-0.9, 0.45): the angle T_2 S_1 Y is obtuse, as Sec. 3.3 describes.
    cosine = (-0.4 * 0.5 + 0.15 * -0.3) / (math.hypot(-0.4, 0.15) * math.hypot(0.5, -0.3))
    assert random["angle T2 S1 Y"] == pytest.approx(math.degrees(math.acos(cosine)))
    assert proposed["|S1' Y|"] < random["|S1' Y|"] and proposed["|T1' Y|"] < random["|T1' Y|"]


@pytest.mark.parametrize("argv", [
    ["montecarlo", "--trials", "0"], ["montecarlo", "--num-peers", "1"],
    ["montecarlo", "--tolerance", "0"], ["ideal", "--ema-decay", "1.5"], ["ideal", "--eta", "-1"],
])
def test_bad_arguments_exit_with_code_2_and_one_line(argv, capsys):
    with pytest.raises(SystemExit) as error:
        simulate.main(argv)
    assert error.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in message and argv[1] in message


def test_no_command_names_both_commands(capsys):
    with pytest.raises(SystemExit) as error:
        simulate.main([])
    assert error.value.code == 2
    message, = capsys.readouterr().err.strip().splitlines()
    assert "ideal" in message and "montecarlo" in message
