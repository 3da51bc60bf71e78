"""SplitNet (Kim et al., ICML 2017): learn to split a deep classifier into a tree of class- and feature-disjoint branches."""
