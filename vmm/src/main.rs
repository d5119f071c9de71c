fn main() { println!("densevm"); }
