"""Chebyshev graph encoder q(z | x, graph) (Bini & Marchand-Maillet, 2025, Sec. 3.2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import ChebConv


class FullGraphChebConv(ChebConv):
    r""":class:`~torch_geometric.nn.conv.ChebConv` on a subgraph with the full graph's degrees.

    With the symmetric normalised Laplacian and :math:`\lambda_{\max} = 2`, the scaled
    Laplacian is :math:`\hat L = -D^{-1/2} W D^{-1/2}` and

    .. math::
        X' = \sum_{k=1}^{K} T_k(\hat L)\, X\, \Theta^{(k)}.

    :class:`~torch_geometric.nn.conv.ChebConv` would take the degrees :math:`D` from the
    subgraph's own edges, which differ from the full graph's for cells on the subgraph's
    border. Here the degree of each node is the sum of its (possibly perturbed) edge weights
    inside the subgraph plus ``degree_outside``, so a seed cell whose (K-1)-hop
    neighbourhood lies in the subgraph gets exactly its full-graph output, and a perturbation
    of the weights moves the degrees consistently.

    Shapes:
        - **input:** node features :math:`(|V|, F_{in})`, edge indices :math:`(2, |E|)`
          (both directions of each edge), edge weights :math:`(|E|)`, ``degree_outside``
          :math:`(|V|)`
        - **output:** node features :math:`(|V|, F_{out})`
    """

    def forward(  # type: ignore[override]
        self, x: Tensor, edge_index: Tensor, edge_weight: Tensor, degree_outside: Tensor,
        n_out: int | None = None,
    ) -> Tensor:
        """``n_out``: return only the first ``n_out`` nodes' outputs. With ``K <= 2`` only
        the edges into those nodes then carry messages (the degrees still come from all
        edges), which is what a subgraph batch needs for its seed cells."""
        degree = degree_outside.index_add(0, edge_index[1], edge_weight)
        inv_sqrt = degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt()
        norm = -edge_weight * inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]]
        if n_out is not None and len(self.lins) <= 2:
            x_out = x[:n_out]
            out = self.lins[0](x_out)
            if len(self.lins) > 1:
                into = edge_index[1] < n_out
                tx_1 = self.propagate(edge_index[:, into], x=(x, x_out), norm=norm[into],
                                      size=(x.shape[0], n_out))
                out = out + self.lins[1](tx_1)
            return out if self.bias is None else out + self.bias
        if n_out is not None:
            return self.forward(x, edge_index, edge_weight, degree_outside)[:n_out]
        tx_0, tx_1 = x, x
        out = self.lins[0](tx_0)
        if len(self.lins) > 1:
            tx_1 = self.propagate(edge_index, x=x, norm=norm)
            out = out + self.lins[1](tx_1)
        for lin in self.lins[2:]:
            tx_2 = 2.0 * self.propagate(edge_index, x=tx_1, norm=norm) - tx_0
            out = out + lin(tx_2)
            tx_0, tx_1 = tx_1, tx_2
        if self.bias is not None:
            out = out + self.bias
        return out


class GraphEncoder(nn.Module):
    r"""Chebyshev GNN on [log-normalised expression, LPE] :math:`\to (\mu, \log\sigma^2)`.

    The expression enters through a linear projection computed sparsely
    (:func:`torch.nn.functional.embedding_bag` over the stored counts, cost
    :math:`O(\mathrm{nnz} \cdot H)`), which is the first Chebyshev term's weight applied
    before propagation: since :math:`T_k(\hat L)` acts on cells and :math:`\Theta` on
    features, :math:`T_k(\hat L) X \Theta = T_k(\hat L)(X\Theta)`.

    In training, the input projection is computed exactly for every node, but the backward
    pass goes through it only for the seed cells (the first ``n_seed`` nodes): the
    neighbours' projections are constants, as GNNAutoScale treats its historical embeddings
    (Fey et al., 2021). The projection of the ~15 times more neighbours would otherwise
    dominate a step's cost.

    Parameters
    ----------
    n_input
        Number of genes.
    n_lpe
        Number of Laplacian positional encodings (0 to use none).
    n_latent
        Latent dimension.
    n_hidden
        Hidden width.
    cheb_k
        Chebyshev filter size K of each graph layer (K - 1 hops).
    n_layers
        Number of graph layers; the receptive field is ``n_layers * (cheb_k - 1)`` hops.
    dropout_rate
        Dropout after each hidden layer.

    Shapes:
        - **input:** CSR rows ``crow`` :math:`(|V| + 1)`, ``col``, ``value``
          :math:`(\mathrm{nnz})` of the nodes' log-normalised expression, ``lpe``
          :math:`(|V|, \text{n_lpe})` and the subgraph as in :class:`FullGraphChebConv`
        - **output:** mean and log-variance, :math:`(n, \text{n_latent})` each, for the
          first ``n_seed`` nodes (all with ``n_seed=None``)
    """

    def __init__(
        self,
        n_input: int,
        n_lpe: int,
        n_latent: int,
        n_hidden: int = 128,
        cheb_k: int = 2,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        if cheb_k < 1 or n_layers < 1:
            raise ValueError("GraphEncoder needs cheb_k >= 1 and n_layers >= 1.")
        self.cheb_k = cheb_k  # 1: each cell alone, the edges unused
        self.n_lpe = n_lpe
        self.expression = nn.EmbeddingBag(n_input, n_hidden, mode="sum")
        self.expression_bias = nn.Parameter(torch.zeros(n_hidden))
        self.lpe = nn.Linear(n_lpe, n_hidden, bias=False) if n_lpe > 0 else None
        self.input_norm = nn.LayerNorm(n_hidden)
        self.convs = nn.ModuleList(
            [FullGraphChebConv(n_hidden, n_hidden, K=cheb_k) for _ in range(n_layers)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(n_hidden) for _ in range(n_layers)])
        self.dropout = nn.Dropout(dropout_rate)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)
        nn.init.normal_(self.expression.weight, std=n_input**-0.5)

    def project(self, crow: Tensor, col: Tensor, value: Tensor) -> Tensor:
        """Sparse ``X @ W + b`` over CSR rows (a weighted embedding-bag sum): the input
        projection of each cell, which depends on that cell's expression alone."""
        return F.embedding_bag(col, self.expression.weight, crow[:-1], mode="sum",
                               per_sample_weights=value) + self.expression_bias

    def project_nodes(self, crow: Tensor, col: Tensor, value: Tensor,
                      n_seed: int | None = None) -> Tensor:
        """The input projection (:meth:`project`) of a batch's nodes; in training only the
        first ``n_seed`` rows (the seed cells) carry gradients."""
        if self.training and n_seed is not None:
            split = int(crow[n_seed])
            seeds = self.project(crow[: n_seed + 1], col[:split], value[:split])
            with torch.no_grad():
                others = self.project(crow[n_seed:] - split, col[split:], value[split:])
            return torch.cat([seeds, others])
        return self.project(crow, col, value)

    @property
    def n_hops(self) -> int:
        """Receptive field in hops: subgraphs of this depth make seed encodings exact."""
        return sum(len(conv.lins) - 1 for conv in self.convs)

    def forward(
        self,
        projection: Tensor,
        lpe: Tensor | None,
        edge_index: Tensor,
        edge_weight: Tensor,
        degree_outside: Tensor,
        n_seed: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode from the nodes' input projections (:meth:`project_nodes`), so that a pass
        over many subgraphs projects each cell's expression once, not once per subgraph.

        With ``n_seed``, only the first ``n_seed`` nodes (the seed cells) are encoded: the
        last graph layer computes just their outputs. Otherwise every node is encoded.
        """
        h = projection
        if self.lpe is not None and lpe is not None:
            h = h + self.lpe(lpe)
        h = self.dropout(F.gelu(self.input_norm(h)))
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = conv(h, edge_index, edge_weight, degree_outside,
                     n_out=n_seed if i == last else None)
            h = self.dropout(F.gelu(norm(h)))
        return self.mean(h), self.logvar(h).clamp(-12.0, 8.0)
