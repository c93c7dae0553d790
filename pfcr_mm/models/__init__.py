"""Model families written here (pure torch), for architectures no installed package ships."""
