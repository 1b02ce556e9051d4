"""Solutions to the exercises of tutorial 07 (S-GRPO and T-SPMO)."""


# Exercise 1: T-SPMO by brute force
def pair_advantage(completions, rewards, prefix, v):
    """A(prefix, v) from the definition: two filtered means, no tree."""
    def mean_starting_with(p):
        rs = [r for c, r in zip(completions, rewards) if tuple(c[:len(p)]) == tuple(p)]
        return sum(rs) / len(rs)

    return mean_starting_with(tuple(prefix) + (v,)) - mean_starting_with(prefix)


# Exercise 2: How many tokens does S-GRPO keep?
def expected_kept(n, alpha, p):
    """The first min(alpha, n) tokens always, each of the other n - alpha with probability p."""
    first = min(alpha, n)
    return first + p * (n - first)
