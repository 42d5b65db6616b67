"""``prefill-router adapt``: a lightly adapted encoder (issue 34, part 2).

The encoder's top ``k`` blocks above layer ``L``, fine-tuned with the router's trunk on the routing labels from
captured layer-``L`` token states (:mod:`training.adapt.run`, :mod:`training.adapt.train`,
:mod:`training.adapt.model`); the blocks ship in the artifact (:mod:`shared.adapter`) and the Encoder replica
runs them.
"""
