"""The embedded classification demo: a synthetic shapes data set generated from a seed."""
