"""The micro world (:mod:`flamingo.micro.world`): the synthetic scenes and texts of the micro model."""
